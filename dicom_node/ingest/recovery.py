"""The one recovery routine, run at every start of ``triage serve`` before the port opens.

What a crash (SIGKILL, power cut) can leave in the storage folder, and what is done with it:

* ``spool/.incoming/*.part``: instances still arriving; never acknowledged, so deleted;
* ``.<name>.<random>.tmp`` in the spool and quarantine folders: durable writes cut before
  their rename; never acknowledged, deleted;
* spool files without an instance row: an acknowledged instance whose row a power cut took back
  (SQLite ``synchronous = NORMAL`` keeps the last commits only in its WAL until the next
  checkpoint), or an instance renamed into place whose commit never happened (not
  acknowledged; recording it is harmless). The spool files are fsynced before any answer, so
  they are the truth: every file whose path is ``spool/<study>/<series>/<sop>.dcm`` with valid
  UIDs and no row gets one (:meth:`~triage_core.worklist.ingest.Ingest.record_instances` skips the
  known ones in one query per batch).

There is no clean-shutdown marker and no journal to replay: the same routine runs after a clean
stop and after a crash, so the rarely taken path is the everyday one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.ingest.spool import INCOMING_DIR
from triage_core.errors import ConfigError
from triage_core.uids import hash_identifier, is_valid_uid

if TYPE_CHECKING:
    from triage_core.worklist import InstanceRecord, Worklist

logger = logging.getLogger(__name__)

#: Left by earlier versions (receipt journal, clean-shutdown marker).
_OLD_JOURNAL = "journal"
_OLD_MARKER = ".clean-shutdown"


@dataclass(frozen=True)
class Recovered:
    """What :func:`recover_storage` found."""

    partials: int = 0  # spool/.incoming/*.part deleted
    temporaries: int = 0  # interrupted durable writes deleted
    rerecorded: int = 0  # spool files that got their row back
    seconds: float = 0.0


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _check_no_old_journal(storage: Path) -> None:
    """Refuse to start over receipt-journal segments of an earlier version (they may hold
    acknowledged instances that only that version can replay)."""
    folder = storage / _OLD_JOURNAL
    if not folder.is_dir():
        return
    segments = sorted(folder.glob("segment-*.wal"))
    if segments:
        raise ConfigError(
            f"{folder} holds {len(segments)} receipt-journal segment(s) from an earlier version "
            "(the journal was removed): start that version once to replay them, stop it "
            "cleanly, then start this one"
        )
    for leftover in folder.glob("*.wal.tmp"):
        leftover.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: someone else's files, left alone


def _with_header(records: list[InstanceRecord], worklist: Worklist, salt: str) -> list[Any]:
    """The records without a row yet, with SOP Class UID and accession hash from their files'
    headers, like the rows of live C-STOREs (an unreadable header leaves them empty: the
    pipeline then reports the file)."""
    import dataclasses

    import pydicom
    from pydicom.errors import InvalidDicomError

    known = worklist.ingest.known_instances([r.sop_uid for r in records])
    out = []
    for record in (r for r in records if r.sop_uid not in known):
        try:
            ds = pydicom.dcmread(
                record.path,
                stop_before_pixels=True,
                specific_tags=["SOPClassUID", "AccessionNumber"],
            )
            record = dataclasses.replace(
                record,
                sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
                accession_hash=hash_identifier(str(ds.get("AccessionNumber", "") or ""), salt),
            )
        except (OSError, InvalidDicomError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("spooled instance %s: header unreadable (%s)", record.sop_uid, exc)
        out.append(record)
    return out


def recover_storage(
    storage: Path, worklist: Worklist, batch: int = 1000, salt: str = ""
) -> Recovered:
    """Bring ``storage`` and the worklist back in step (see the module docstring).

    ``salt`` is the installation's identifier salt (the accession hash of re-recorded rows).

    Raises :class:`ConfigError` when an earlier version's receipt journal is still there.
    """
    from triage_core.worklist import InstanceRecord

    started = time.perf_counter()
    storage = storage.resolve()
    _check_no_old_journal(storage)
    (storage / _OLD_MARKER).unlink(missing_ok=True)
    spool = storage / "spool"
    partials = temporaries = added = 0
    for part in (spool / INCOMING_DIR).glob("*.part"):
        part.unlink(missing_ok=True)
        partials += 1
    for leftover in (storage / "quarantine").glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
        temporaries += 1
    records: list[InstanceRecord] = []
    studies = sorted(p for p in spool.iterdir() if p.is_dir()) if spool.is_dir() else []
    for study_dir in studies:
        if study_dir.name == INCOMING_DIR:
            continue
        for series_dir in (p for p in study_dir.iterdir() if p.is_dir()):
            for path in series_dir.iterdir():
                if _is_temporary(path):
                    path.unlink(missing_ok=True)
                    temporaries += 1
                    continue
                uids = (study_dir.name, series_dir.name, path.stem)
                if path.suffix != ".dcm" or not all(is_valid_uid(u) for u in uids):
                    continue
                records.append(InstanceRecord(uids[0], uids[2], path, series_uid=uids[1]))
                if len(records) >= batch:
                    added += sum(
                        worklist.ingest.record_instances(_with_header(records, worklist, salt))
                    )
                    records = []
    if records:
        added += sum(worklist.ingest.record_instances(_with_header(records, worklist, salt)))
    found = Recovered(partials, temporaries, added, time.perf_counter() - started)
    log = logger.warning if (partials or temporaries or added) else logger.info
    log(
        "storage recovery: %d partial instance(s) and %d interrupted write(s) deleted, "
        "%d spooled instance(s) re-recorded, in %.2f s",
        found.partials,
        found.temporaries,
        found.rerecorded,
        found.seconds,
    )
    return found
