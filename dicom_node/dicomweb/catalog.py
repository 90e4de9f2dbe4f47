"""What QIDO-RS finds and WADO-RS returns: received instances and our own results, by UID.

Two sources, both keyed by UIDs that were checked against the DICOM UID grammar before they
reached a path:

- received instances: the worklist's instance rows
  (:meth:`~triage_core.worklist.queries.WorklistQueries.instance_files`), whose files lie in
  the spool (``STORAGE/spool/<study>/<series>/<sop>.dcm``), whether they came by C-STORE or
  STOW-RS;
- our results: the SR and the Grad-CAM SC of a processed study, in ``STORAGE/outbox/<study>/``
  (a new series each, in the same study), found beside the received ones.

Attribute values come from the files' headers (read without pixel data, kept in an LRU cache
keyed by path, size and modification time: files never change once written), not from the
database, which holds no patient data in clear. A query therefore costs one header read per
new file, then a dictionary look-up; ``retention_days`` keeps the spool, and so this cost,
bounded.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage_core.uids import is_valid_uid

if TYPE_CHECKING:
    import pydicom

    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

#: Headers kept in memory (a CR header is a few kilobytes as a pydicom data set).
HEADER_CACHE = 4096
#: Elements longer than this (bytes) are answered as a BulkDataURI in /metadata and QIDO-RS.
BULK_THRESHOLD = 4096
ENCAPSULATED_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")


@dataclass(frozen=True)
class Entry:
    """One instance we can give: where it is and what it is."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    result: bool  # our SR or SC (outbox), not a received instance


@functools.lru_cache(maxsize=HEADER_CACHE)
def _header(path: Path, size: int, mtime_ns: int) -> pydicom.Dataset:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for _ in ds.iterall():  # every raw element converted now, before threads share it, so
        pass  # an element is one object for good (the BulkDataURI paths are keyed by it)
    return ds


def read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a stored file (no pixel data), cached; ``None`` if it is gone or unreadable
    (purged between the listing and the read, or a damaged file: logged, never raised)."""
    try:
        stat = os.stat(path)
        return _header(path, stat.st_size, stat.st_mtime_ns)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a bad file must not break a whole query
        logger.warning("stored file %s cannot be read as DICOM: %s", path.name, exc)
        return None


class Catalog:
    """The instances of the node (see the module docstring).

    Parameters
    ----------
    worklist : Worklist
        The process's worklist (instance rows).
    storage : Path
        The storage folder (``outbox/`` holds our results).
    """

    def __init__(self, worklist: Worklist, storage: Path) -> None:
        self.worklist = worklist
        self.outbox = storage.resolve() / "outbox"

    def entries(
        self,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[Entry]:
        """Instances (received first, then results), optionally of one study, series or SOP.

        Every UID given must be valid (the routes check them and answer 400 otherwise).
        """
        for uid in (study_uid, series_uid, sop_uid):
            if uid is not None and not is_valid_uid(uid):
                raise ValueError(f"{uid!r} is not a valid UID")
        rows = self.worklist.queries.instance_files(study_uid, series_uid, sop_uid)
        out = [Entry(st, se, sop, cls, path, False) for st, se, sop, cls, path in rows]
        studies = (
            [study_uid] if study_uid is not None else list(dict.fromkeys(e.study_uid for e in out))
        )
        for study in studies:
            out.extend(self._results(study, series_uid, sop_uid))
        return out

    def _results(self, study_uid: str, series_uid: str | None, sop_uid: str | None) -> list[Entry]:
        folder = self.outbox / study_uid
        if not folder.is_dir():
            return []
        found = []
        for path in sorted(folder.glob("*.dcm")):
            sop = path.stem
            if not is_valid_uid(sop) or (sop_uid is not None and sop != sop_uid):
                continue
            header = read_header(path)
            if header is None:
                continue
            series = str(header.get("SeriesInstanceUID", ""))
            if series_uid is not None and series != series_uid:
                continue
            found.append(
                Entry(study_uid, series, sop, str(header.get("SOPClassUID", "")), path, True)
            )
        return found


def transfer_syntax(header: pydicom.Dataset) -> str:
    meta = getattr(header, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


#: Deepest sequence nesting of a bulk data path, and most items counted in one sequence.
MAX_BULK_DEPTH = 8
MAX_ITEM = 1_000_000


class BulkPathError(ValueError):
    """A bulk data path that is not ``TAG[/ITEM/TAG]...`` (400)."""


def element_paths(ds: pydicom.Dataset, prefix: str = "", depth: int = 0) -> dict[int, str]:
    """``id(element) -> path`` for every element of ``ds``: ``TAG`` at the top level and
    ``TAG/ITEM/TAG`` inside a sequence (tags in 8 hex digits, items counted from 0)."""
    out: dict[int, str] = {}
    for element in ds:
        path = f"{prefix}{int(element.tag):08X}"
        out[id(element)] = path
        if element.VR == "SQ" and depth < MAX_BULK_DEPTH:
            for index, item in enumerate(element.value):
                out.update(element_paths(item, f"{path}/{index}/", depth + 1))
    return out


def bulk_uri_handler(instance_url: str, paths: dict[int, str]) -> Callable[[Any], str]:
    """``to_json_dict``'s bulk data handler: ``{instance}/bulkdata/{path}`` (the element's
    place in the header, :func:`element_paths`), which the bulkdata route resolves."""

    def handler(element: Any) -> str:
        path = paths.get(id(element), f"{int(element.tag):08X}")
        return f"{instance_url}/bulkdata/{path}"

    return handler


def parse_bulk_path(text: str) -> list[int]:
    """``"00283000/0/00283006"`` -> ``[0x00283000, 0, 0x00283006]`` (checked, bounded)."""
    parts = text.strip("/").split("/")
    if len(parts) % 2 == 0 or len(parts) > 2 * MAX_BULK_DEPTH + 1:
        raise BulkPathError(f"a bulk data path is TAG[/ITEM/TAG]..., at most {MAX_BULK_DEPTH} deep")
    out = []
    for position, part in enumerate(parts):
        if position % 2 == 0:
            if len(part) != 8 or any(c not in "0123456789abcdefABCDEF" for c in part):
                raise BulkPathError(f"{part[:20]!r} is not a tag of 8 hexadecimal digits")
            out.append(int(part, 16))
        else:
            if not part.isdecimal() or not part.isascii() or int(part) >= MAX_ITEM:
                raise BulkPathError(f"{part[:20]!r} is not a sequence item number")
            out.append(int(part))
    return out


def nested_value(header: pydicom.Dataset, path: list[int]) -> bytes | None:
    """The bytes of the element at ``path`` in ``header``, ``None`` if absent or not binary."""
    ds = header
    for position in range(0, len(path) - 1, 2):
        tag, index = path[position], path[position + 1]
        if tag not in ds or ds[tag].VR != "SQ" or index >= len(ds[tag].value):
            return None
        ds = ds[tag].value[index]
    if path[-1] not in ds:
        return None
    value = ds[path[-1]].value
    return bytes(value) if isinstance(value, bytes | bytearray) else None


def dataset_json(header: pydicom.Dataset, instance_url: str, with_pixels: bool) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of a header, bulk data by URI; ``with_pixels`` adds Pixel Data's
    BulkDataURI (the header was read without it)."""
    body: dict[str, Any] = header.to_json_dict(
        bulk_data_threshold=BULK_THRESHOLD,
        bulk_data_element_handler=bulk_uri_handler(instance_url, element_paths(header)),
    )
    if with_pixels and "Rows" in header:
        encapsulated = transfer_syntax(header).startswith(ENCAPSULATED_PREFIXES)
        vr = "OB" if encapsulated or int(header.get("BitsAllocated", 16) or 16) <= 8 else "OW"
        body["7FE00010"] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulkdata/7FE00010"}
    return body
