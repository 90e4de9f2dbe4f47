"""One C-STORE data set, from its command to its status: the receive path of ``triage serve``.

Transport-neutral: :mod:`dicom_node.net.ulp` reads the PDUs and drives an
:class:`IncomingInstance` per C-STORE, which only writes, checks, makes durable, records and
answers; inference runs elsewhere. The path (the rule of docs/durability.md: success only
after the bytes and their row are durable):

1. the data set is written as received (never decoded and re-encoded) to a temporary file
   under ``STORAGE/spool/.incoming/``, fragment by fragment while it arrives, after the
   preamble and the file meta built from the command (:mod:`~dicom_node.ingest.filemeta`);
2. a structural scan (:func:`~dicom_node.ingest.scanner.scan_dataset`) proves the stream is
   complete and finds the study, series and instance UIDs (a truncated or malformed stream
   gets 0xC210 and the file goes to ``STORAGE/quarantine/``);
3. every UID is checked against the DICOM UID grammar before it is used in a path;
4. the file is fsynced and renamed to ``STORAGE/spool/<study>/<series>/<sop>.dcm``, its folder
   fsynced, then the instance row is committed (shared with concurrent associations by the
   :class:`~dicom_node.ingest.spool.GroupCommitter`), and only then is 0x0000 returned. A
   repeated SOP Instance UID keeps the first copy and is recorded once. A full disk, a failed
   fsync (fatal for that file: it is removed) or a database failure answers 0xA700.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
import uuid
from pathlib import Path

from dicom_node.ingest.durable import (
    WRITEBACK_STEP,
    ensure_dir,
    fsync_dir,
    is_inside,
    start_writeback,
    write_all,
)
from dicom_node.ingest.filemeta import encode_file_meta
from dicom_node.ingest.quarantine import quarantine
from dicom_node.ingest.scanner import HeaderInfo, scan_dataset
from dicom_node.ingest.spool import StoreContext, spool_path
from triage_core.errors import ImageReadError, InvalidUIDError, TriageError, TruncatedFileError
from triage_core.uids import check_uid

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210


class IncomingInstance:
    """One C-STORE data set being received, from its command to its status.

    :meth:`open` creates ``STORAGE/spool/.incoming/<random>.part`` with the preamble and file
    meta; :meth:`write` appends data set fragments as they arrive; :meth:`finish` checks,
    makes durable, records and returns the status to answer (see the module docstring).
    :meth:`discard` drops an instance whose association ended before its last fragment (it was
    never acknowledged). A storage error while writing (disk full) keeps reading the rest of the
    data set so the association stays in step, and answers 0xA700.
    """

    def __init__(
        self,
        ctx: StoreContext,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str,
        context_class: str,
        study_uid: str = "",
    ) -> None:
        self.ctx = ctx
        self.study_uid = study_uid  # STOW-RS to /studies/{study}: the data set must be of it
        self.info: HeaderInfo | None = None  # the data set's values, once checked
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.calling_ae = calling_ae
        self.context_class = context_class
        self.started = time.perf_counter()
        self.tmp = ctx.incoming / f"{uuid.uuid4().hex}.part"
        self.fd = -1
        self.offset = 0  # where the data set starts in the file
        self.size = 0
        self.error: OSError | None = None
        self.synced = 0

    @classmethod
    def open(
        cls,
        ctx: StoreContext,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str,
        context_class: str = "",
        study_uid: str = "",
    ) -> IncomingInstance:
        incoming = cls(
            ctx,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            calling_ae=calling_ae,
            context_class=context_class or sop_class_uid,
            study_uid=study_uid,
        )
        ctx.enter()
        meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
        incoming.offset = len(meta)
        try:
            incoming.fd = os.open(incoming.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
            incoming.size = write_all(incoming.fd, meta)
        except OSError as exc:
            incoming._fail(exc)
        return incoming

    # -------------------------------------------------------------- receiving
    def write(self, piece: memoryview) -> None:
        """Append a data set fragment (ignored after a storage error)."""
        if self.error is not None:
            return
        try:
            self.size += write_all(self.fd, piece)
            if self.ctx.fsync and self.size - self.synced >= WRITEBACK_STEP:
                start_writeback(self.fd, self.synced, self.size - self.synced)
                self.synced = self.size
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self._close()
        self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self, why: str) -> None:
        """Drop an instance that will never be acknowledged."""
        logger.warning(
            "C-STORE from %s of %s dropped: %s", self.calling_ae, self.sop_instance_uid[:64], why
        )
        self._close()
        self.tmp.unlink(missing_ok=True)
        self.ctx.leave()

    # -------------------------------------------------------------- completing
    def finish(self) -> int:
        """Check, make durable, record; return the C-STORE status."""
        try:
            return self._finish()
        except BaseException:
            self._close()
            self.tmp.unlink(missing_ok=True)
            raise
        finally:
            self.ctx.leave()

    def _storage_failure(self, exc: OSError, what: str) -> int:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        self.ctx.count("failed", "disk_full" if full else "storage_error")
        logger.error(
            "C-STORE from %s: %s %s: %s",
            self.calling_ae,
            "disk full writing" if full else f"cannot {what}",
            self.sop_instance_uid[:64],
            exc,
        )
        return STATUS_OUT_OF_RESOURCES

    def _scan(self) -> HeaderInfo:
        length = self.size - self.offset
        if length <= 0:
            raise TruncatedFileError("C-STORE data set", "empty data set")
        # Mapped, not read: the scan touches element headers only (a few pages of a 10 MB
        # image). No explicit close: an exception's traceback may still hold views of the
        # map; it is unmapped when the last one goes.
        mapped = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ)
        return scan_dataset(memoryview(mapped)[self.offset :], self.transfer_syntax)

    def _reject(self, status: int, reason: str, label: str) -> int:
        ctx = self.ctx
        ctx.count("rejected", label)
        self._close()
        where = quarantine(
            self.tmp,
            ctx.quarantine,
            ctx.storage,
            calling_ae=self.calling_ae,
            reason=reason,
            fsync=ctx.fsync,
        )
        logger.warning(
            "C-STORE from %s refused with 0x%04X: %s (quarantined as %s)",
            self.calling_ae,
            status,
            reason,
            where,
        )
        return status

    def _check(self) -> HeaderInfo | int:
        """The data set's identifying values, or the status of its refusal."""
        req_sop, req_class = self.sop_instance_uid, self.sop_class_uid
        try:
            check_uid(req_sop, "Affected SOP Instance UID")
            check_uid(req_class, "Affected SOP Class UID")
            info = self._scan()
            check_uid(info.study_uid, "Study Instance UID")
            check_uid(info.series_uid, "Series Instance UID")
            check_uid(info.sop_instance_uid, "SOP Instance UID")
        except InvalidUIDError as exc:
            return self._reject(STATUS_CANNOT_UNDERSTAND, str(exc), "invalid_uid")
        except ImageReadError as exc:
            return self._reject(STATUS_CANNOT_UNDERSTAND, str(exc), "undecodable")
        except OSError as exc:
            self._close()
            self.tmp.unlink(missing_ok=True)
            return self._storage_failure(exc, "read back")
        class_differs = bool(info.sop_class_uid) and info.sop_class_uid != req_class
        if info.sop_instance_uid != req_sop or class_differs:
            return self._reject(
                STATUS_DATASET_MISMATCH,
                f"data set UIDs ({info.sop_class_uid}, {info.sop_instance_uid}) differ from the "
                f"request ({req_class}, {req_sop})",
                "dataset_mismatch",
            )
        if self.study_uid and info.study_uid != self.study_uid:
            return self._reject(
                STATUS_DATASET_MISMATCH,
                f"Study Instance UID {info.study_uid} is not the study of the request "
                f"({self.study_uid})",
                "dataset_mismatch",
            )
        return info

    def _finish(self) -> int:
        ctx = self.ctx
        if self.error is not None:
            return self._storage_failure(self.error, "write")
        info = self._check()
        if isinstance(info, int):
            return info
        self.info = info
        path = spool_path(ctx.spool, info)
        if not is_inside(path.parent, ctx.spool):  # belt and braces: grammar already excludes it
            return self._reject(
                STATUS_CANNOT_UNDERSTAND, "path would leave the spool folder", "invalid_uid"
            )
        try:
            size = self._place(path)
        except OSError as exc:
            return self._storage_failure(exc, "store")
        written = time.perf_counter()
        try:
            if ctx.committer is not None and ctx.concurrent() > 1:
                new = ctx.committer.commit(info, path, size, self.calling_ae)
            else:  # alone: a hand-off to the committer thread would only add latency
                if ctx.fsync:
                    try:
                        fsync_dir(path.parent)
                    except OSError:
                        path.unlink(missing_ok=True)  # its rename may not be durable
                        raise
                new = ctx.record(info, path, size, self.calling_ae)
        except TriageError as exc:
            ctx.count("failed", "database")
            logger.error(
                "C-STORE from %s: instance %s not recorded: %s",
                self.calling_ae,
                self.sop_instance_uid,
                exc,
            )
            return STATUS_OUT_OF_RESOURCES
        except OSError as exc:  # the folder fsync
            return self._storage_failure(exc, "make durable")
        ctx.count("stored" if new else "duplicate")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "C-STORE %s study=%s sop=%s %s %d bytes ts=%s write=%.1fms record=%.1fms%s",
                self.calling_ae,
                info.study_uid,
                self.sop_instance_uid,
                ctx.describe(info),
                size,
                self.transfer_syntax,
                (written - self.started) * 1e3,
                (time.perf_counter() - written) * 1e3,
                "" if new else " (duplicate)",
            )
        return STATUS_SUCCESS

    def _place(self, target: Path) -> int:
        """fsync the temporary file and rename it to ``path``; returns the size kept there.

        A repeat keeps the first copy (renamed in whole, so complete); it is recorded again by
        the caller in case the first attempt failed after the rename. A failed fsync is fatal
        for this file: it is closed and removed, never fsynced again (see
        :mod:`~dicom_node.ingest.durable`).
        """
        try:
            if target.is_file():
                self._close()
                self.tmp.unlink(missing_ok=True)
                return target.stat().st_size
            if self.ctx.fsync:
                os.fsync(self.fd)
            self._close()
            ensure_dir(target.parent, self.ctx.storage, self.ctx.fsync)
            os.replace(self.tmp, target)
        except OSError:
            self._close()
            self.tmp.unlink(missing_ok=True)
            raise
        return self.size
