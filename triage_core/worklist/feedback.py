"""Readers' verdicts on a study's findings: append-only rows, and the final verdict they give.

A reader marks a finding of a processed study ``present``, ``absent`` or ``unsure``
(:meth:`Feedback.add`), on the model's findings or on any other ChestX-ray14 finding
(:data:`NIH_FINDINGS`: "other finding"). Each row records who, when, and the model name,
version and probability the reader saw; a changed mind is a new row, never an update.

The final verdict of a finding (:func:`combine`) takes each reader's latest verdict: the one
decided answer (``present``/``absent``) when every reader who decided agrees, ``disputed`` when
they disagree, ``unsure`` when nobody decided. Live accuracy (:meth:`Feedback.labelled`) and the
training export (:meth:`Feedback.export_studies`) use decided findings only.

The free-text note is stored for readers (``GET /api/studies/{uid}/feedback``) and is never
logged nor exported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from triage_core.errors import WorklistError
from triage_core.worklist.database import Database
from triage_core.worklist.records import check_name, iso, timestamp

#: What a reader may say about a finding.
VERDICTS: tuple[str, ...] = ("present", "absent", "unsure")
#: Longest note kept (characters).
MAX_NOTE = 2000
#: The fourteen ChestX-ray14 findings: the names a reader may give as "other finding", and the
#: vocabulary of the exported ``Finding Labels``.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)


class StudyNotFound(WorklistError):
    """No study with that UID."""


class FeedbackRefused(WorklistError):
    """A verdict the worklist does not take (the message says why; HTTP 409 or 422)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def combine(verdicts: Iterable[str]) -> str:
    """The final verdict from each reader's latest one (see the module docstring)."""
    decided = {v for v in verdicts if v in ("present", "absent")}
    if len(decided) == 1:
        return decided.pop()
    return "disputed" if decided else "unsure"


@dataclass(frozen=True)
class Labelled:
    """One scored finding of one study with a decided final verdict."""

    study_uid: str
    model_name: str
    model_version: str
    finding: str
    probability: float
    flagged: bool
    truth: bool


@dataclass(frozen=True)
class ExportStudy:
    """A study whose every scored finding has a decided final verdict."""

    study_uid: str
    labels: tuple[str, ...]
    readers: int
    model_name: str
    model_version: str
    images: tuple[tuple[str, str], ...] = field(default=())  # (sop_uid, spool path), eligible
    judged: int = 0  # findings with a decided final verdict (scored and other)


class Feedback:
    """The ``verdicts`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
        self,
        study_uid: str,
        finding: str,
        verdict: str,
        user: str,
        note: str = "",
        now: float | None = None,
    ) -> dict[str, Any]:
        """Record one verdict; returns it as :meth:`for_study` shows it.

        Raises
        ------
        StudyNotFound
            Unknown study.
        FeedbackRefused
            The study is not processed (409), or the finding, verdict, user or note is not
            acceptable (422).
        """
        check_name(user)
        if verdict not in VERDICTS:
            raise FeedbackRefused(f"verdict {str(verdict)[:40]!r} is not one of {VERDICTS}")
        note = note or ""
        if len(note) > MAX_NOTE:
            raise FeedbackRefused(f"note is {len(note)} characters; at most {MAX_NOTE}")
        t = self._db.tables
        s, r, v = t.studies, t.results, t.verdicts
        ts = timestamp(now)
        with self._db.write() as conn:
            study = conn.execute(
                select(s.c.status, s.c.model_name, s.c.model_version).where(
                    s.c.study_uid == study_uid
                )
            ).first()
            if study is None:
                raise StudyNotFound(f"study {study_uid} not found")
            if study.status != "done":
                raise FeedbackRefused(
                    f"study {study_uid} is {study.status}, not processed: no finding to judge",
                    409,
                )
            scored = {
                row.finding: float(row.probability)
                for row in conn.execute(
                    select(r.c.finding, r.c.probability).where(r.c.study_uid == study_uid)
                )
            }
            if finding not in scored and finding not in NIH_FINDINGS:
                raise FeedbackRefused(
                    f"finding {str(finding)[:64]!r} is neither one of this study's findings "
                    f"({', '.join(sorted(scored))}) nor a ChestX-ray14 finding"
                )
            row_id = conn.execute(
                v.insert().values(
                    study_uid=study_uid,
                    finding=finding,
                    verdict=verdict,
                    note=note,
                    user_name=user,
                    at=ts,
                    model_name=study.model_name,
                    model_version=study.model_version,
                    probability=scored.get(finding),
                )
            ).inserted_primary_key
        return {
            "id": int(row_id[0]) if row_id else 0,
            "finding": finding,
            "verdict": verdict,
            "user": user,
            "at": iso(ts),
            "model": study.model_name,
            "model_version": study.model_version,
            "probability": scored.get(finding),
            "note": note,
        }

    def study_status(self, study_uid: str) -> str | None:
        """The study's status, ``None`` when unknown."""
        s = self._db.tables.studies
        with self._db.read() as conn:
            found = conn.execute(select(s.c.status).where(s.c.study_uid == study_uid)).scalar()
        return None if found is None else str(found)

    def studies_with_verdicts(self) -> list[str]:
        """The UIDs of the studies with at least one verdict, in the order of their first."""
        v = self._db.tables.verdicts
        with self._db.read() as conn:
            rows = conn.execute(
                select(v.c.study_uid, func.min(v.c.id).label("first"))
                .group_by(v.c.study_uid)
                .order_by("first")
            ).all()
        return [str(r.study_uid) for r in rows]

    def for_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every verdict on one study, oldest first."""
        v = self._db.tables.verdicts
        with self._db.read() as conn:
            rows = conn.execute(select(v).where(v.c.study_uid == study_uid).order_by(v.c.id)).all()
        return [
            {
                "id": int(x.id),
                "finding": x.finding,
                "verdict": x.verdict,
                "user": x.user_name,
                "at": iso(x.at),
                "model": x.model_name,
                "model_version": x.model_version,
                "probability": x.probability,
                "note": x.note,
            }
            for x in rows
        ]

    def _latest(
        self, conn: Any, study_uids: Sequence[str] | None = None
    ) -> dict[str, dict[str, dict[str, str]]]:
        """Per study, per finding, per user: that user's latest verdict."""
        v = self._db.tables.verdicts
        query = select(v.c.study_uid, v.c.finding, v.c.user_name, v.c.verdict).order_by(v.c.id)
        if study_uids is not None:
            query = query.where(v.c.study_uid.in_(list(study_uids)))
        out: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
        for study, finding, user, verdict in conn.execute(query):
            out[study][finding][user] = verdict
        return out

    def final_verdicts(self, study_uid: str) -> dict[str, dict[str, Any]]:
        """Per finding of one study: ``verdict`` (see :func:`combine`) and ``by`` (user ->
        latest verdict)."""
        with self._db.read() as conn:
            latest = self._latest(conn, [study_uid]).get(study_uid, {})
        return {
            finding: {"verdict": combine(users.values()), "by": dict(users)}
            for finding, users in sorted(latest.items())
        }

    def labelled(self) -> list[Labelled]:
        """Every scored finding with a decided final verdict, on the study's current scores."""
        t = self._db.tables
        s, r = t.studies, t.results
        with self._db.read() as conn:
            latest = self._latest(conn)
            if not latest:
                return []
            rows = conn.execute(
                select(
                    r.c.study_uid,
                    s.c.model_name,
                    s.c.model_version,
                    r.c.finding,
                    r.c.probability,
                    r.c.present,
                )
                .join(s, s.c.study_uid == r.c.study_uid)
                .where(s.c.status == "done", r.c.study_uid.in_(list(latest)))
                .order_by(r.c.study_uid, r.c.id)
            ).all()
        out = []
        for study, name, version, finding, probability, present in rows:
            final = combine(latest[study].get(finding, {}).values())
            if final in ("present", "absent"):
                out.append(
                    Labelled(
                        study,
                        name,
                        version,
                        finding,
                        float(probability),
                        bool(present),
                        final == "present",
                    )
                )
        return out

    def export_studies(self) -> list[ExportStudy]:
        """Processed studies whose every scored finding has a decided final verdict.

        ``labels`` are the findings judged present (scored or "other"), sorted; an "other"
        finding that is disputed or unsure is left out of the labels (it is not scored, so the
        study is still complete). ``images`` are the study's eligible images.
        """
        t = self._db.tables
        s, r, ir, i, v = t.studies, t.results, t.image_results, t.instances, t.verdicts
        with self._db.read() as conn:
            latest = self._latest(conn)
            if not latest:
                return []
            uids = list(latest)
            studies = {
                row.study_uid: row
                for row in conn.execute(
                    select(s.c.study_uid, s.c.model_name, s.c.model_version).where(
                        s.c.study_uid.in_(uids), s.c.status == "done"
                    )
                )
            }
            scored: dict[str, set[str]] = defaultdict(set)
            for study, finding in conn.execute(
                select(r.c.study_uid, r.c.finding).where(r.c.study_uid.in_(uids))
            ):
                scored[study].add(finding)
            readers: dict[str, set[str]] = defaultdict(set)
            for study, user in conn.execute(
                select(v.c.study_uid, v.c.user_name).where(v.c.study_uid.in_(uids))
            ):
                readers[study].add(user)
            images: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for study, sop, path in conn.execute(
                select(i.c.study_uid, i.c.sop_uid, i.c.path)
                .join(ir, (ir.c.study_uid == i.c.study_uid) & (ir.c.uid == i.c.sop_uid))
                .where(i.c.study_uid.in_(uids), ir.c.eligible.is_(True), ir.c.error == "")
                .order_by(i.c.study_uid, i.c.received_at, i.c.sop_uid)
            ):
                images[study].append((sop, path))
        out = []
        for uid in sorted(studies):
            finals = {f: combine(users.values()) for f, users in latest[uid].items()}
            if not scored[uid] or any(
                finals.get(f) not in ("present", "absent") for f in scored[uid]
            ):
                continue
            row = studies[uid]
            out.append(
                ExportStudy(
                    uid,
                    tuple(sorted(f for f, final in finals.items() if final == "present")),
                    len(readers[uid]),
                    row.model_name,
                    row.model_version,
                    tuple(images[uid]),
                    sum(final in ("present", "absent") for final in finals.values()),
                )
            )
        return out
