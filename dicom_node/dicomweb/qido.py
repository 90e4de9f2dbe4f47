"""QIDO-RS (PS3.18 10.6): search studies, series and instances, answered as DICOM JSON.

Matching follows PS3.4 C.2.2.2 on the stored headers (:mod:`~dicom_node.dicomweb.catalog`):

- single value matching; an empty value is universal matching (the attribute is returned);
- UID list matching for UI attributes (values separated by ``,`` or ``\\``);
- wildcard matching (``*`` and ``?``) for string VRs other than UI; person names are matched
  without regard to case;
- range matching for DA, TM and DT (``20260101-20261231``, ``-2026``, ``2026-``);
- ``ModalitiesInStudy`` matches a study when any of its series has one of the modalities.

``limit`` (at most :data:`MAX_RESULTS`, the default), ``offset`` and ``includefield`` (keywords
or tags, comma-separated or repeated, or ``all``) are supported. What is not is refused with
400 and a message: fuzzy matching (``fuzzymatching=true``), sequence matching (dotted keys),
unknown attributes or parameters.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dicom_node.dicomweb.catalog import Entry, dataset_json, read_header

if TYPE_CHECKING:
    import pydicom

#: Most results in one answer (and the default ``limit``).
MAX_RESULTS = 1000

STUDY, SERIES, INSTANCE = "study", "series", "instance"

#: Attributes returned by default at each level (PS3.18 Table 10.6.3-3 to -5, those we hold).
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    STUDY: (
        "SpecificCharacterSet",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "TimezoneOffsetFromUTC",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
    ),
    SERIES: (
        "SpecificCharacterSet",
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
    ),
    INSTANCE: (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}
#: Attributes computed from the catalog, not read from a header.
COMPUTED = {
    "ModalitiesInStudy": (0x00080061, "CS"),
    "NumberOfStudyRelatedSeries": (0x00201206, "IS"),
    "NumberOfStudyRelatedInstances": (0x00201208, "IS"),
    "NumberOfSeriesRelatedInstances": (0x00201209, "IS"),
    "InstanceAvailability": (0x00080056, "CS"),
    "RetrieveURL": (0x00081190, "UR"),
}
_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
_STRING_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR", "AS"})


class QueryError(ValueError):
    """A query we refuse (answered 400 with the message)."""


@dataclass(frozen=True)
class Query:
    """A parsed QIDO-RS query."""

    match: dict[str, tuple[int, str, str]]  # keyword -> (tag, VR, value)
    include: frozenset[str]
    include_all: bool
    limit: int
    offset: int


def _keyword(key: str) -> tuple[str, int, str]:
    """``PatientID`` or ``00100020`` -> (keyword, tag, VR); raises :class:`QueryError`."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

    if "." in key:
        raise QueryError(f"{key!r}: sequence matching is not supported")
    if key in COMPUTED:
        tag, vr = COMPUTED[key]
        return key, tag, vr
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        tag = int(key, 16)
        keyword = keyword_for_tag(tag)
        if keyword in COMPUTED:
            return keyword, tag, COMPUTED[keyword][1]
    else:
        found = tag_for_keyword(key)
        if found is None:
            raise QueryError(f"unknown query parameter or attribute {key!r}")
        tag, keyword = int(found), key
    try:
        vr = str(dictionary_VR(tag))
    except KeyError as exc:
        raise QueryError(f"unknown attribute {key!r}") from exc
    return keyword or f"{tag:08X}", tag, vr


def parse_query(params: Sequence[tuple[str, str]]) -> Query:
    """The query parameters of a QIDO-RS request (repeated keys allowed for includefield)."""
    match: dict[str, tuple[int, str, str]] = {}
    include: set[str] = set()
    include_all = False
    limit, offset = MAX_RESULTS, 0
    for key, value in params:
        if key == "fuzzymatching":
            if value.strip().lower() == "true":
                raise QueryError("fuzzymatching is not supported: send literal values")
            if value.strip().lower() != "false":
                raise QueryError("fuzzymatching must be true or false")
        elif key in ("limit", "offset"):
            if not value.isdigit() or len(value) > 9:
                raise QueryError(f"{key} must be a non-negative integer")
            if key == "limit":
                limit = min(int(value), MAX_RESULTS)
            else:
                offset = int(value)
        elif key == "includefield":
            for name in (v.strip() for v in value.split(",")):
                if name == "all":
                    include_all = True
                elif name:
                    include.add(_keyword(name)[0])
        else:
            keyword, tag, vr = _keyword(key)
            if keyword in COMPUTED and keyword != "ModalitiesInStudy":
                raise QueryError(f"{keyword} cannot be matched, only returned")
            if len(value) > 1024:
                raise QueryError(f"value of {key} longer than 1024 characters")
            match[keyword] = (tag, vr, value)
    return Query(match, frozenset(include), include_all, limit, offset)


# ---------------------------------------------------------------------- matching
def _date_range(text: str, value: str) -> bool:
    low, sep, high = text.partition("-")
    if not sep:
        return value == text
    if not value:
        return False
    width = max(len(low), len(high))
    head = value[:width] if width else value
    return (not low or head >= low[: len(head)]) and (not high or head <= high[: len(head)])


def matches_value(vr: str, wanted: str, element_value: Any) -> bool:
    """Whether a header value matches a QIDO-RS value of that VR (PS3.4 C.2.2.2)."""
    if wanted == "":
        return True
    values = element_value if isinstance(element_value, list | tuple) else [element_value]
    texts = ["" if v is None else str(v) for v in values] or [""]
    if vr == "UI":
        options = {u.strip() for u in re.split(r"[,\\]", wanted) if u.strip()}
        return any(t in options for t in texts)
    if vr in ("DA", "TM", "DT"):
        return any(_date_range(wanted, t.split(".")[0] if vr == "TM" else t) for t in texts)
    if vr in _STRING_VRS:
        fold = vr == "PN"
        pattern = wanted.lower() if fold else wanted
        pattern = pattern.replace("[", "[[]")  # fnmatch classes are not DICOM wildcards
        return any(
            fnmatch.fnmatchcase(t.lower() if fold else t, pattern) for t in texts if t or wanted
        )
    options = {w.strip() for w in wanted.split(",")}
    return any(t in options for t in texts)


# ---------------------------------------------------------------------- grouping and answers
@dataclass
class Group:
    """A study or a series: its entries, the first one's header standing for the group."""

    uid: str
    entries: list[Entry]
    header: pydicom.Dataset | None = None


def group(entries: Iterable[Entry], key: str) -> list[Group]:
    """Entries grouped by ``study_uid`` or ``series_uid``, in first-seen order."""
    out: dict[str, Group] = {}
    for entry in entries:
        uid = getattr(entry, key)
        out.setdefault(uid, Group(uid, [])).entries.append(entry)
    return list(out.values())


def _representative(entries: Sequence[Entry]) -> pydicom.Dataset | None:
    for entry in entries:
        header = read_header(entry.path)
        if header is not None:
            return header
    return None


def _modalities(entries: Sequence[Entry]) -> list[str]:
    found: list[str] = []
    for series in group(entries, "series_uid"):
        header = _representative(series.entries)
        modality = str(header.get("Modality", "")) if header is not None else ""
        if modality and modality not in found:
            found.append(modality)
    return found


def _set(out: dict[str, Any], tag: int, vr: str, values: list[Any]) -> None:
    out[f"{tag:08X}"] = {"vr": vr, "Value": values} if values else {"vr": vr}


def _copy(out: dict[str, Any], header_json: Mapping[str, Any], header: Any, keyword: str) -> None:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return
    key = f"{int(tag):08X}"
    if key in header_json:
        out[key] = header_json[key]


@dataclass(frozen=True)
class Level:
    """What one QIDO-RS answer holds: its level and the levels above it that it includes."""

    level: str
    include_study: bool
    include_series: bool


def search(entries: list[Entry], level: Level, query: Query, base: str) -> tuple[list[Any], bool]:
    """Match ``entries`` at ``level``; returns the DICOM JSON results and whether more than
    ``limit`` matched (the answer then says so in a Warning header)."""
    results: list[Any] = []
    skipped = 0
    more = False
    units: list[Group]
    key = {STUDY: "study_uid", SERIES: "series_uid", INSTANCE: "sop_uid"}[level.level]
    units = group(entries, key)
    studies = {g.uid: g for g in group(entries, "study_uid")}
    series_of = {g.uid: g for g in group(entries, "series_uid")}
    for unit in units:
        header = _representative(unit.entries)
        if header is None:
            continue
        first = unit.entries[0]
        study = studies[first.study_uid]
        series = series_of[first.series_uid]
        if not _unit_matches(unit, header, query, study):
            continue
        if skipped < query.offset:
            skipped += 1
            continue
        if len(results) >= query.limit:
            more = True
            break
        results.append(_answer(unit, header, level, query, base, study, series))
    return results, more


def _unit_matches(unit: Group, header: Any, query: Query, study: Group) -> bool:
    for keyword, (tag, vr, wanted) in query.match.items():
        if keyword == "ModalitiesInStudy":
            mods = _modalities(study.entries)
            wanted_set = {w.strip() for w in re.split(r"[,\\]", wanted) if w.strip()}
            if wanted_set and not wanted_set.intersection(mods):
                return False
            continue
        element = header.get(tag)
        value = element.value if element is not None else ""
        if not matches_value(vr, wanted, value):
            return False
    return True


def _answer(
    unit: Group,
    header: Any,
    level: Level,
    query: Query,
    base: str,
    study: Group,
    series: Group,
) -> dict[str, Any]:
    first = unit.entries[0]
    study_url = f"{base}/studies/{first.study_uid}"
    series_url = f"{study_url}/series/{first.series_uid}"
    instance_url = f"{series_url}/instances/{first.sop_uid}"
    header_json = dataset_json(header, instance_url, with_pixels=False)
    out: dict[str, Any] = {}
    if query.include_all:
        out.update(header_json)
    fields: list[str] = []
    if level.include_study or level.level == STUDY:
        fields += DEFAULT_FIELDS[STUDY]
    if level.include_series or level.level in (SERIES,):
        fields += DEFAULT_FIELDS[SERIES]
    if level.level == INSTANCE:
        fields += DEFAULT_FIELDS[INSTANCE]
    for keyword in [*fields, *sorted(query.include), *query.match]:
        if keyword not in COMPUTED:
            _copy(out, header_json, header, keyword)
    _set(out, *COMPUTED["InstanceAvailability"], ["ONLINE"])
    if level.level == STUDY or level.include_study:
        _set(out, *COMPUTED["ModalitiesInStudy"], _modalities(study.entries))
        n_series = len({e.series_uid for e in study.entries})
        _set(out, *COMPUTED["NumberOfStudyRelatedSeries"], [n_series])
        _set(out, *COMPUTED["NumberOfStudyRelatedInstances"], [len(study.entries)])
    if level.level == SERIES or level.include_series:
        _set(out, *COMPUTED["NumberOfSeriesRelatedInstances"], [len(series.entries)])
    url = {STUDY: study_url, SERIES: series_url, INSTANCE: instance_url}[level.level]
    _set(out, *COMPUTED["RetrieveURL"], [url])
    # the identifying UIDs of every level the answer covers (PS3.18 Table 10.6.3-3 to -5)
    _set(out, 0x0020000D, "UI", [first.study_uid])
    if level.level in (SERIES, INSTANCE):
        _set(out, 0x0020000E, "UI", [first.series_uid])
    if level.level == INSTANCE:
        _set(out, 0x00080018, "UI", [first.sop_uid])
        _set(out, 0x00080016, "UI", [first.sop_class_uid] if first.sop_class_uid else [])
    return dict(sorted(out.items()))
