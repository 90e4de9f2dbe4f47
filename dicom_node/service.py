"""The running service: C-STORE SCP, scheduler jobs, inference workers, deliveries, HTTP API.

:class:`NodeService` wires the parts together for ``triage serve`` (everything) and
``triage worker`` (workers, deliveries and the multi-process-safe jobs, no DICOM port, no HTTP):

* the C-STORE SCP (:mod:`dicom_node.scp`) spools instances and records them in the worklist;
* APScheduler 3 jobs (``BackgroundScheduler``): stable-study detection (``stable_age``),
  expired-lease recovery (back to ``queued``; ``failed`` after ``max_attempts``), delivery
  retries with exponential backoff, optional retention purge;
* worker threads claim a study (lease, renewed until the study is finished), run
  :func:`triage_core.pipeline.triage_study` (inference and Grad-CAM from the same pass) and
  hand the result to the outputs thread, then claim the next study;
* the outputs thread has the SR (:class:`triage_core.dicom_out.ReportBuilder`) and the Grad-CAM
  SC (:func:`triage_core.dicom_out.build_sc`, at most ``sc_max_side`` pixels) built and written
  under ``STORAGE/outbox/<study>/`` by a spawned outputs process (:func:`write_study_outputs`:
  pure-Python work that would otherwise hold this process's GIL while a worker infers), then
  records the result and one delivery row per object and destination in one transaction;
* a delivery thread, woken when a study completes and by the retry job, sends the due
  deliveries by C-STORE (:mod:`dicom_node.scu`), one association per destination and pass
  (every due object of that destination, SR before SC); a failed send is retried with backoff;
* the HTTP API (:func:`dicom_node.api.create_app`) runs under uvicorn in a thread.

Every study stage is logged once, with its duration, by UID (never patient identifiers).
The worker threads share one :class:`~triage_core.inference.Predictor` (forward passes are
serialised by its lock; Grad-CAM runs on the explainer's private copy of the model).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.handlers import HeaderInfo, StoreContext, write_durable
from dicom_node.settings import Destination, NodeSettings
from triage_core.errors import DeliveryError, TriageError, WorklistError

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    import pydicom

    from dicom_node.journal import ReceiptJournal
    from dicom_node.metrics import Metrics
    from triage_core.dicom_out import ReportBuilder
    from triage_core.inference import Predictor
    from triage_core.pipeline import StudyOutput
    from triage_core.spec import Finding, ModelSpec, StudyResult
    from triage_core.worklist import ClaimedStudy, DeliveryRow, Worklist

logger = logging.getLogger(__name__)

#: Most deliveries claimed (and sent, one association per destination) in one pass.
_DELIVERY_BATCH = 200

#: C-STORE statuses after which sending the same object again is pointless.
_PERMANENT_REFUSALS = (0xA900, 0xC000)


@dataclass(frozen=True)
class ProcessOutcome:
    """What one worker pass over a claimed study did (for tests and benchmarks)."""

    study_uid: str
    status: str
    outputs: tuple[Path, ...] = ()
    seconds: float = 0.0


@dataclass
class _Triaged:
    """A study between its worker (inference, Grad-CAM) and the outputs thread."""

    claimed: ClaimedStudy
    out: StudyOutput
    spec: ModelSpec
    started: float
    triaged_at: float
    keeper: threading.Event  # set: stop renewing the lease


@dataclass(frozen=True)
class OutputJob:
    """What :func:`write_study_outputs` needs (picklable: it may run in another process)."""

    study_uid: str
    result: StudyResult
    sources: tuple[pydicom.Dataset, ...]  # header-only copies of the study's images
    overlay: np.ndarray | None
    cam_source_uid: str
    cam_finding: Finding | None
    spec: ModelSpec
    outbox: Path
    root: Path


#: The outputs process's report builder (one model per service: rebuilt if the spec changes).
_REPORT_BUILDERS: list[ReportBuilder] = []


def _report_builder(spec: ModelSpec) -> ReportBuilder:
    from triage_core.dicom_out import ReportBuilder

    if not _REPORT_BUILDERS or _REPORT_BUILDERS[0].spec != spec:
        _REPORT_BUILDERS[:] = [ReportBuilder(spec)]
    return _REPORT_BUILDERS[0]


def write_study_outputs(job: OutputJob) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """Build the SR (:class:`~triage_core.dicom_out.ReportBuilder`) and the Grad-CAM SC of a
    done study and write them durably under ``job.outbox``, SR first.

    Returns ``[(SOP Instance UID, path)]`` and the seconds spent on ``sr``, ``sc`` and
    ``write`` (encode + write + fsync).
    """
    from triage_core.dicom_out import build_sc

    t0 = time.perf_counter()
    objects = [_report_builder(job.spec).build(job.result, list(job.sources))]
    t_sr = time.perf_counter()
    if job.overlay is not None and job.cam_finding is not None:
        source = next((ds for ds in job.sources if ds.SOPInstanceUID == job.cam_source_uid), None)
        if source is not None:
            objects.append(build_sc(job.overlay, source, job.cam_finding, job.spec))
    t_sc = time.perf_counter()
    written = []
    for ds in objects:  # the SR first: it is delivered first too
        sop_uid = str(ds.SOPInstanceUID)
        path = job.outbox / f"{sop_uid}.dcm"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        write_durable(path, [buffer.getbuffer()], job.root)
        written.append((sop_uid, str(path)))
    timings = {"sr": t_sr - t0, "sc": t_sc - t_sr, "write": time.perf_counter() - t_sc}
    return written, timings


def _init_output_process() -> None:
    """Imports of the outputs process, paid once at start."""
    import highdicom  # noqa: F401

    from triage_core import dicom_out  # noqa: F401


def _output_process_ready() -> bool:
    return True


def _header_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds`` without pixel data (cheap to send to the outputs process)."""
    import pydicom

    header = pydicom.Dataset()
    header.update({elem.tag: elem for elem in ds if elem.tag.group != 0x7FE0})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def open_worklist(settings: NodeSettings) -> Worklist:
    """The worklist of ``settings`` (schema created if needed)."""
    from triage_core.worklist import Worklist

    worklist = Worklist(
        settings.database_url,
        max_attempts=settings.max_attempts,
        max_delivery_attempts=settings.delivery_max_attempts,
        delivery_backoff_base=settings.delivery_backoff,
        delivery_backoff_cap=max(settings.delivery_backoff_max, settings.delivery_backoff),
        sqlite_synchronous=settings.sqlite_synchronous,
    )
    worklist.create_all()
    return worklist


SALT_FILE = ".identifier-salt"


def installation_salt(storage: Path) -> str:
    """The secret salt of this installation for identifier hashes, created on first use.

    It lives in the storage folder (mode 0600), so nodes sharing a storage volume hash alike.
    """
    import secrets

    path = storage / SALT_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(16) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path.read_text().strip()


def make_record_many(worklist: Worklist, salt: str = "") -> Any:
    """``record_many`` of :class:`~dicom_node.handlers.GroupCommitter`: one transaction."""
    from triage_core.worklist import InstanceRecord, hash_identifier

    def record_many(items: list[tuple[HeaderInfo, Path, int, str]]) -> list[bool]:
        return worklist.record_instances(
            [
                InstanceRecord(
                    info.study_uid,
                    info.sop_instance_uid,
                    path,
                    series_uid=info.series_uid,
                    sop_class_uid=info.sop_class_uid,
                    accession_hash=hash_identifier(info.accession_number, salt),
                )
                for info, path, _size, _calling in items
            ]
        )

    return record_many


#: Written at a clean stop; its absence at start means the spool must be reconciled.
CLEAN_MARKER = ".clean-shutdown"


def reconcile_spool(worklist: Worklist, spool: Path, batch: int = 1000) -> int:
    """Record every spooled instance the database does not know (after a crash).

    The spool files are fsynced before a C-STORE is answered, so they are the journal: with
    SQLite ``synchronous=NORMAL`` a power cut may lose the last committed rows, never the files.
    The path gives the UIDs (``spool/<study>/<series>/<sop>.dcm``); leftover temporary files of
    interrupted writes are deleted. Returns the number of rows added.
    """
    from dicom_node.handlers import is_valid_uid
    from triage_core.worklist import InstanceRecord

    started = time.perf_counter()
    records: list[Any] = []
    added = 0
    for study_dir in sorted(p for p in spool.iterdir() if p.is_dir()) if spool.is_dir() else []:
        for series_dir in (p for p in study_dir.iterdir() if p.is_dir()):
            for path in series_dir.iterdir():
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                    continue
                uids = (study_dir.name, series_dir.name, path.stem)
                if path.suffix != ".dcm" or not all(is_valid_uid(u) for u in uids):
                    continue
                records.append(InstanceRecord(uids[0], uids[2], path, series_uid=uids[1]))
                if len(records) >= batch:
                    added += sum(worklist.record_instances(records))
                    records = []
    if records:
        added += sum(worklist.record_instances(records))
    log = logger.warning if added else logger.info
    log(
        "spool reconciliation: %d instance(s) re-recorded in %.1f s",
        added,
        time.perf_counter() - started,
    )
    return added


def make_recorder(worklist: Worklist, salt: str = "") -> Any:
    """The ``record`` callable of :class:`StoreContext`: one instance, one transaction."""
    record_many = make_record_many(worklist, salt)

    def record(info: HeaderInfo, path: Path, size: int, calling_ae: str) -> bool:
        return bool(record_many([(info, path, size, calling_ae)])[0])

    return record


def describe_model(spec: ModelSpec, path: Path | None) -> str:
    """A one-paragraph model card for the start-up log."""
    parts = [
        f"model {spec.display_name} ({spec.arch}, {spec.task}, {spec.input_size} px)",
        f"checkpoint {path}" if path else "",
        "classes "
        + ", ".join(
            f"{n} (threshold {t:.3f}, weight {w:g})"
            for n, t, w in zip(
                spec.class_names, spec.thresholds, spec.priority_weights, strict=True
            )
        ),
        f"temperature {spec.temperature:g}",
    ]
    test = spec.metrics.get("test") if isinstance(spec.metrics, dict) else None
    if isinstance(test, dict) and "mean_auroc" in test:
        parts.append(
            f"test mean AUROC {float(test['mean_auroc']):.3f} ({test.get('images')} images)"
        )
    if path is not None:
        from triage_core.models import model_card_path

        card = model_card_path(path)
        parts.append(f"model card {card}" if card else "no model card beside the checkpoint")
    if spec.code_version:
        parts.append(f"code {spec.code_version}")
    return "; ".join(p for p in parts if p)


class NodeService:
    """The service of ``triage serve`` (``role="serve"``) or ``triage worker`` (``"worker"``).

    Parameters
    ----------
    settings : NodeSettings
        Validated settings (see :func:`dicom_node.settings.check_runtime`).
    model_path : Path, optional
        Resolved checkpoint (``NAME``); ``None`` uses the default checkpoint.
    role : str
        ``serve``: SCP + scheduler + workers + HTTP API; ``worker``: workers, deliveries and
        the scheduler jobs that are safe with several processes.
    """

    def __init__(
        self, settings: NodeSettings, model_path: Path | None = None, role: str = "serve"
    ) -> None:
        if role not in ("serve", "worker"):
            raise ValueError(f"role must be 'serve' or 'worker', got {role!r}")
        self.settings = settings
        self.model_path = model_path
        self.role = role
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.worklist: Worklist | None = None
        self.store: StoreContext | None = None
        self.journal: ReceiptJournal | None = None
        self.committer: Any = None
        self.metrics: Metrics | None = None
        self.scp: Any = None
        self.scheduler: Any = None
        self.http_server: Any = None
        self.spec: ModelSpec | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._work = threading.Event()
        self._predictor: Predictor | None = None
        # triaged studies waiting for their outputs (None: stop); short, for back-pressure
        self._outputs: queue.Queue[_Triaged | None] = queue.Queue(maxsize=2)
        self._output_thread: threading.Thread | None = None
        self._deliver = threading.Event()
        self._delivery_thread: threading.Thread | None = None
        self._output_pool: ProcessPoolExecutor | None = None
        self.processed = 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start every part; the DICOM port opens last, so a C-ECHO answer means ready."""
        settings = self.settings
        self.worklist = open_worklist(settings)
        from dicom_node.metrics import Metrics

        self.metrics = Metrics(self.worklist)
        logger.info("worklist %s", settings.redacted_url())
        if settings.workers > 0:
            self._load_models()
            self._start_output_pool()
        self._start_scheduler()
        for index in range(settings.workers):
            thread = threading.Thread(
                target=self._worker_loop, args=(index,), name=f"triage-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        if settings.workers > 0:
            self._output_thread = threading.Thread(
                target=self._outputs_loop, name="triage-outputs", daemon=True
            )
            self._output_thread.start()
        self._delivery_thread = threading.Thread(
            target=self._delivery_loop, name="triage-delivery", daemon=True
        )
        self._delivery_thread.start()
        if self.role == "serve":
            self._recover_spool()
            salt = installation_salt(settings.storage)
            self._start_http()
            from dicom_node.handlers import GroupCommitter
            from dicom_node.scp import start_scp

            self.committer = GroupCommitter(
                make_record_many(self.worklist, salt), fsync=settings.spool_fsync
            )
            self.store = StoreContext(
                storage=settings.storage,
                record=make_recorder(self.worklist, salt),
                log_phi=settings.log_phi,
                salt=salt,
                metrics=self.metrics,
                fsync=settings.spool_fsync,
                committer=self.committer,
                record_many=make_record_many(self.worklist, salt),
                journal_limit=settings.journal_max_instance,
            )
            if settings.receipt_journal:
                from dicom_node.journal import ReceiptJournal

                # replays what a crash left before the port opens
                self.journal = ReceiptJournal(
                    settings.storage / "journal",
                    self.store.materialize,
                    fsync=settings.spool_fsync,
                    gather_seconds=settings.journal_batch_window,
                ).open()
                self.store.journal = self.journal
            if not settings.spool_fsync:
                logger.warning(
                    "spool_fsync is OFF: a success status no longer means the instance "
                    "survives a power cut (benchmarks only)"
                )
            self.scp = start_scp(settings, self.store)
            journal, server = self.journal, self.scp
            self.metrics.attach_receiver(
                lambda: float(journal.pending) if journal is not None else 0.0,
                lambda: float(len(server.active_associations)),
            )
        logger.info(
            "%s %s started: %d worker(s), destinations: %s",
            self.role,
            self.node_id,
            settings.workers,
            ", ".join(str(d) for d in settings.destinations) or "none",
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let workers finish their study, stop the jobs and the API."""
        self._stop.set()
        self._work.set()
        if self.scp is not None:
            self.scp.shutdown()
            self.scp = None
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._output_thread is not None:  # finish what the workers handed over
            try:
                self._outputs.put(None, timeout=max(0.1, deadline - time.monotonic()))
            except queue.Full:
                logger.warning("outputs thread busy at stop; its studies' leases will expire")
            self._output_thread.join(max(0.0, deadline - time.monotonic()))
            self._output_thread = None
        if self._output_pool is not None:
            self._output_pool.shutdown(wait=True, cancel_futures=True)
            self._output_pool = None
        if self._delivery_thread is not None:
            self._deliver.set()
            self._delivery_thread.join(max(0.0, deadline - time.monotonic()))
            self._delivery_thread = None
        if self.http_server is not None:
            self.http_server.should_exit = True
        if self.committer is not None:
            self.committer.close()
            self.committer = None
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self.worklist is not None:
            self.worklist.dispose()
            if self.role == "serve" and self._marker_path() is not None:
                marker = self.settings.storage / CLEAN_MARKER
                write_durable(marker, [b"clean\n"], self.settings.storage.resolve())
        logger.info("%s %s stopped", self.role, self.node_id)

    def _marker_path(self) -> Path | None:
        """The clean-shutdown marker (SQLite with synchronous=NORMAL only)."""
        url = self.settings.database_url
        if not url.startswith("sqlite") or self.settings.sqlite_synchronous == "FULL":
            return None
        return self.settings.storage / CLEAN_MARKER

    def _recover_spool(self) -> None:
        """After an unclean stop, re-record spooled instances whose rows a crash lost."""
        marker = self._marker_path()
        if marker is None:
            return
        assert self.worklist is not None
        if marker.exists():
            marker.unlink()
            fd = os.open(marker.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        reconcile_spool(self.worklist, self.settings.spool_dir)

    def wait(self) -> None:
        """Block until :meth:`request_stop` is called."""
        while not self._stop.wait(0.5):
            pass

    def request_stop(self) -> None:
        self._stop.set()
        self._work.set()

    @property
    def scp_port(self) -> int:
        return int(self.scp.server_address[1]) if self.scp is not None else 0

    # ------------------------------------------------------------------ model
    def _load_models(self) -> None:
        """Load the model once for the process; worker threads share the Predictor.

        ``Predictor`` serialises forward passes with its own lock and PyTorch already uses every
        core for one batch, so several copies would only cost memory; the threads still overlap
        reading and decoding images with another study's inference.
        """
        from triage_core.inference import Predictor

        settings = self.settings
        started = time.perf_counter()
        # Default: leave one core to the C-STORE and network threads (OpenMP threads that
        # compete for every core collapse under load: measured 1 image/s instead of 40 with
        # 2 threads on 2 busy cores).
        threads = settings.threads or max(1, (os.cpu_count() or 1) - 1)
        predictor = Predictor(
            self.model_path,
            device=settings.device,
            threads=threads,
            batch_size=settings.batch_size,
        )
        self._predictor = predictor
        self.spec = predictor.spec
        self._warm_up(predictor)
        logger.info(
            "%s (loaded in %.1f s, device %s, %d torch thread(s), mode %s)",
            describe_model(self.spec, self.model_path),
            time.perf_counter() - started,
            settings.device,
            threads,
            getattr(predictor, "mode", "?"),
        )

    def _warm_up(self, predictor: Predictor) -> None:
        """Pay one-time costs before the port opens: first forward, Grad-CAM import and hooks,
        the DICOM output stack. The first study then takes as long as the next ones."""
        import numpy as np

        started = time.perf_counter()
        predictor.warmup()
        if self.settings.with_cam:
            size = predictor.spec.input_size
            image = np.random.default_rng(0).random((size, size)).astype(np.float32)
            predictor.explainer().explain(image, 0)
        import highdicom  # noqa: F401 - imported for its import time only

        from triage_core import dicom_out, pipeline  # noqa: F401

        logger.info("warm-up done in %.1f s", time.perf_counter() - started)

    # ------------------------------------------------------------------ scheduler
    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        settings = self.settings
        scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        interval = settings.scheduler_interval
        if self.role == "serve":
            scheduler.add_job(
                self.queue_stable, "interval", seconds=interval, id="stable", name="stable studies"
            )
        scheduler.add_job(
            self.recover_leases,
            "interval",
            seconds=max(interval, min(5.0, settings.lease_seconds / 4)),
            id="leases",
            name="expired leases",
        )
        scheduler.add_job(
            self._wake_delivery,
            "interval",
            seconds=max(interval, 1.0),
            id="deliver",
            name="deliveries",
        )
        if settings.retention_days and self.role == "serve":
            scheduler.add_job(self.purge, "interval", hours=1, id="purge", name="retention purge")
        scheduler.start()
        self.scheduler = scheduler

    def _wake_delivery(self) -> None:
        """Wake the delivery thread (a study completed, or the retry job's period is up)."""
        self._deliver.set()

    def _delivery_loop(self) -> None:
        """Send due deliveries whenever woken, off the worker and outputs threads.

        Woken when a study completes (so delivery overlaps the next study's processing) and by
        the ``deliver`` job every second, which keeps the retries with backoff going; which rows
        are due is the worklist's business (``next_attempt_at``).
        """
        while not self._stop.is_set():
            self._deliver.wait(max(self.settings.scheduler_interval, 1.0))
            self._deliver.clear()
            if self._stop.is_set():
                return
            try:
                while self.deliver_due() >= _DELIVERY_BATCH:  # more may be due: go on
                    pass
            except Exception:  # noqa: BLE001 - deliver_due records its errors; keep serving
                logger.exception("delivery pass failed")

    def queue_stable(self) -> list[str]:
        """Job: queue studies without new instances for ``stable_age`` seconds."""
        assert self.worklist is not None
        try:
            queued = self.worklist.queue_stable_studies(self.settings.stable_age)
        except WorklistError as exc:
            logger.error("stable-study detection failed: %s", exc)
            return []
        if queued:
            self._work.set()
            for study_uid in queued:
                self._log_received(study_uid)
        return queued

    def _log_received(self, study_uid: str) -> None:
        """The ``received`` stage: instances and how long they took to arrive."""
        assert self.worklist is not None
        try:
            detail = self.worklist.study_detail(study_uid) or {}
        except WorklistError as exc:
            logger.debug("study %s: no detail for the log: %s", study_uid, exc)
            detail = {}
        images = detail.get("images") or []
        times = sorted(str(i.get("received_at") or "") for i in images if i.get("received_at"))
        span = ""
        if len(times) >= 2:
            first, last = (
                datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (times[0], times[-1])
            )
            span = f" over {(last - first).total_seconds():.1f} s"
        logger.info(
            "study %s stage=queued: %s instance(s) received%s, stable for %.1f s",
            study_uid,
            detail.get("num_instances", "?"),
            span,
            self.settings.stable_age,
        )

    def recover_leases(self) -> None:
        """Job: studies whose worker vanished go back to ``queued`` (or ``failed``)."""
        assert self.worklist is not None
        try:
            recovered = self.worklist.recover_expired_leases()
        except WorklistError as exc:
            logger.error("lease recovery failed: %s", exc)
            return
        for study_uid in recovered.requeued:
            logger.warning("study %s stage=requeued (lease expired)", study_uid)
        for study_uid in recovered.failed:
            logger.error(
                "study %s stage=failed (lease expired %d times)",
                study_uid,
                self.settings.max_attempts,
            )
        if recovered.requeued:
            self._work.set()

    def purge(self) -> int:
        """Job: delete finished studies older than ``retention_days`` (rows, spool, outbox).

        Only files inside the storage folder are deleted, then their emptied study and series
        folders. Returns the number of files deleted.
        """
        assert self.worklist is not None and self.settings.retention_days
        try:
            paths = self.worklist.purge(self.settings.retention_days * 86400.0)
        except WorklistError as exc:
            logger.error("retention purge failed: %s", exc)
            return 0
        root = self.settings.storage.resolve()
        keep = {root, root / "spool", root / "outbox", root / "quarantine"}
        removed = 0
        folders: set[Path] = set()
        for raw in paths:
            path = Path(raw).resolve()
            if root not in path.parents:
                logger.error("retention purge: %s is outside the storage folder, kept", path)
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("retention purge: cannot delete %s: %s", path, exc)
                continue
            removed += 1
            folders.update(p for p in path.parents if root in p.parents and p not in keep)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:  # not empty (other studies' files) or already gone
                continue
        if removed:
            logger.info("retention purge removed %d file(s)", removed)
        return removed

    # ------------------------------------------------------------------ workers
    def _worker_loop(self, index: int) -> None:
        """Claim a study, triage it (inference + Grad-CAM), hand it to the outputs thread.

        The outputs thread builds, writes and records the study while this thread already
        claims, decodes and infers the next one (torch releases the GIL during the forward
        pass, so the two overlap on two cores). The hand-over queue is short: a worker never
        runs more than a couple of studies ahead of their outputs.
        """
        assert self.worklist is not None
        worker_id = f"{self.node_id}/w{index}"
        predictor = self._predictor
        assert predictor is not None
        while not self._stop.is_set():
            try:
                claimed = self.worklist.claim_study(worker_id, self.settings.lease_seconds)
            except WorklistError as exc:
                logger.error("%s: claim failed: %s", worker_id, exc)
                self._stop.wait(1.0)
                continue
            if claimed is None:
                self._work.wait(self.settings.scheduler_interval)
                self._work.clear()
                continue
            triaged = self._triage(claimed, predictor)
            if isinstance(triaged, _Triaged):
                self._outputs.put(triaged)

    def _outputs_loop(self) -> None:
        """Build, write and record what the workers triaged, in the order they did."""
        while True:
            triaged = self._outputs.get()
            if triaged is None:
                return
            try:
                self._finish(triaged)
            except Exception:  # noqa: BLE001 - _finish records its own errors; never die here
                logger.exception("study %s: outputs failed", triaged.claimed.study_uid)

    def process_claimed(self, claimed: ClaimedStudy, predictor: Predictor) -> ProcessOutcome:
        """Triage one claimed study, write outputs, add deliveries and complete it (one call)."""
        triaged = self._triage(claimed, predictor)
        if isinstance(triaged, ProcessOutcome):
            return triaged
        return self._finish(triaged)

    def _triage(self, claimed: ClaimedStudy, predictor: Predictor) -> _Triaged | ProcessOutcome:
        """Inference and Grad-CAM of a claimed study; its lease is renewed until it is finished."""
        from triage_core.pipeline import triage_study

        study_uid = claimed.study_uid
        started = time.perf_counter()
        logger.info(
            "study %s stage=processing (%d instance(s), attempt %d, %s)",
            study_uid,
            len(claimed.instances),
            claimed.attempts,
            claimed.worker_id,
        )
        keeper = self._keep_lease(study_uid, claimed.worker_id)
        try:
            out = triage_study(
                study_uid,
                list(claimed.instances),
                predictor,
                with_cam=self.settings.with_cam,
                cam_max_side=self.settings.sc_max_side or None,
            )
        except TriageError as exc:
            keeper.set()
            # A deterministic problem with this study's data: retrying would fail again.
            return self._fail(claimed, f"{exc.__class__.__name__}: {exc}", False, started)
        except Exception as exc:  # noqa: BLE001 - record and retry; the worker must keep going
            keeper.set()
            logger.exception("study %s: unexpected error", study_uid)
            return self._fail(claimed, f"{exc.__class__.__name__}: {exc}", True, started)
        return _Triaged(claimed, out, predictor.spec, started, time.perf_counter(), keeper)

    def _finish(self, triaged: _Triaged) -> ProcessOutcome:
        """Outputs, result and deliveries of a triaged study (one transaction), then delivery."""
        assert self.worklist is not None
        claimed, started = triaged.claimed, triaged.started
        study_uid = claimed.study_uid
        waited = time.perf_counter() - triaged.triaged_at
        try:
            try:
                outputs = self._write_outputs(triaged)
            except TriageError as exc:
                return self._fail(claimed, f"{exc.__class__.__name__}: {exc}", False, started)
            except Exception as exc:  # noqa: BLE001 - record and retry
                logger.exception("study %s: unexpected error", study_uid)
                return self._fail(claimed, f"{exc.__class__.__name__}: {exc}", True, started)
            result = triaged.out.result
            try:
                # result and deliveries in one transaction: a lost lease leaves no orphan delivery
                deliveries = [
                    (sop_uid, path, str(destination))
                    for sop_uid, path in outputs
                    for destination in self.settings.destinations
                ]
                final = self.worklist.complete_study(
                    study_uid, claimed.worker_id, result, deliveries=deliveries
                )
            except WorklistError as exc:
                logger.error("study %s: could not record the result: %s", study_uid, exc)
                return ProcessOutcome(study_uid, "lost-lease", (), time.perf_counter() - started)
        finally:
            triaged.keeper.set()
        if outputs and self.settings.destinations:
            self._wake_delivery()
        seconds = time.perf_counter() - started
        timings = " ".join(f"{k}={v * 1e3:.0f}ms" for k, v in result.timings.items())
        top = result.top_finding
        logger.info(
            "study %s stage=%s in %.2f s: priority %s (%.1f)%s%s %s waited=%.0fms",
            study_uid,
            final,
            seconds,
            result.priority_level,
            result.priority_score,
            f", top {top.name} {top.probability:.3f}" if top else "",
            f", reason: {result.reason}" if result.reason else "",
            timings,
            waited * 1e3,
        )
        self.processed += 1
        if self.metrics is not None:
            self.metrics.studies_processed.labels(status=final).inc()
            self.metrics.inference_seconds.observe(seconds)
        return ProcessOutcome(study_uid, final, tuple(p for _, p in outputs), seconds)

    def _keep_lease(self, study_uid: str, worker_id: str) -> threading.Event:
        """Renew the lease every third of its length until the returned event is set."""
        assert self.worklist is not None
        worklist = self.worklist
        done = threading.Event()
        period = max(0.5, self.settings.lease_seconds / 3)

        def renew() -> None:
            while not done.wait(period):
                try:
                    worklist.renew_lease(study_uid, worker_id, self.settings.lease_seconds)
                except WorklistError as exc:
                    logger.warning("study %s: lease renewal failed: %s", study_uid, exc)
                    return

        threading.Thread(target=renew, name=f"lease-{study_uid[-8:]}", daemon=True).start()
        return done

    def _fail(
        self, claimed: ClaimedStudy, error: str, retry: bool, started: float
    ) -> ProcessOutcome:
        assert self.worklist is not None
        try:
            status = self.worklist.fail_study(
                claimed.study_uid, claimed.worker_id, error, retry=retry
            )
        except WorklistError as exc:
            logger.error("study %s: could not record the failure: %s", claimed.study_uid, exc)
            status = "lost-lease"
        logger.error("study %s stage=%s: %s", claimed.study_uid, status, error)
        if self.metrics is not None and status == "failed":
            self.metrics.studies_processed.labels(status="failed").inc()
        return ProcessOutcome(claimed.study_uid, status, (), time.perf_counter() - started)

    def _write_outputs(self, triaged: _Triaged) -> list[tuple[str, Path]]:
        """Build the SR (and the Grad-CAM SC) of a done study and write them to the outbox.

        The work runs in the outputs process when there is one (see :meth:`start`), so its
        Python code does not compete for this process's GIL with the workers' inference.
        """
        from concurrent.futures.process import BrokenProcessPool

        out = triaged.out
        if out.result.status != "done":
            return []
        job = OutputJob(
            study_uid=triaged.claimed.study_uid,
            result=out.result,
            sources=tuple(_header_only(ds) for ds in out.datasets.values()),
            overlay=out.cam_overlay if out.cam_finding is not None else None,
            cam_source_uid=out.cam_source_uid,
            cam_finding=out.cam_finding,
            spec=triaged.spec,
            outbox=self.settings.outbox_dir / triaged.claimed.study_uid,
            root=self.settings.storage.resolve(),
        )
        started = time.perf_counter()
        pool = self._output_pool
        if pool is None:
            written, timings = write_study_outputs(job)
        else:
            try:
                written, timings = pool.submit(write_study_outputs, job).result()
            except BrokenProcessPool:
                logger.error("the outputs process died; starting a new one")
                self._start_output_pool()
                raise
        outputs = [(sop_uid, Path(path)) for sop_uid, path in written]
        logger.info(
            "study %s stage=outputs %d object(s) in %.0f ms (SR %.0f ms, SC %.0f ms, "
            "encode+write %.0f ms)",
            job.study_uid,
            len(outputs),
            (time.perf_counter() - started) * 1e3,
            timings["sr"] * 1e3,
            timings["sc"] * 1e3,
            timings["write"] * 1e3,
        )
        return outputs

    def _start_output_pool(self) -> None:
        """One child process that builds and writes the outputs (spawned: no torch, no GIL of
        ours); its imports are done here, before the DICOM port opens."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        old, self._output_pool = self._output_pool, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        started = time.perf_counter()
        pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_output_process,
        )
        pool.submit(_output_process_ready).result(timeout=300)
        self._output_pool = pool
        logger.info("outputs process ready in %.1f s", time.perf_counter() - started)

    # ------------------------------------------------------------------ deliveries
    def deliver_due(self) -> int:
        """Job: send due deliveries, one association per destination; returns objects sent."""
        from dicom_node.scu import send_files

        assert self.worklist is not None
        worklist = self.worklist
        try:
            rows = worklist.claim_due_deliveries(
                lease_seconds=max(60.0, self.settings.network_timeout * 2), limit=_DELIVERY_BATCH
            )
        except WorklistError as exc:
            logger.error("delivery pass failed: %s", exc)
            return 0
        by_destination: dict[str, list[DeliveryRow]] = defaultdict(list)
        for row in rows:
            by_destination[row.destination].append(row)
        sent = 0
        for destination_text, group in by_destination.items():
            started = time.perf_counter()
            try:
                destination = Destination.parse(destination_text)
                results = send_files(
                    destination,
                    [row.path for row in group],
                    calling_ae=self.settings.ae_title,
                    timeout=self.settings.network_timeout,
                    max_pdu_size=self.settings.max_pdu_size,
                )
            except (DeliveryError, ValueError) as exc:
                for row in group:
                    self._mark_failed(row, str(exc), permanent=False)
                continue
            for row, res in zip(group, results, strict=True):
                if res.ok:
                    try:
                        worklist.mark_delivery_sent(row.id)
                    except WorklistError as exc:
                        logger.error("delivery %d sent but not recorded: %s", row.id, exc)
                        continue
                    sent += 1
                    if self.metrics is not None:
                        self.metrics.deliveries_sent.inc()
                else:
                    permanent = res.status is not None and any(
                        (res.status & 0xFF00) == code or (res.status & 0xF000) == code
                        for code in _PERMANENT_REFUSALS
                    )
                    self._mark_failed(row, res.message, permanent=permanent)
            for study_uid in sorted({row.study_uid for row in group}):
                logger.info(
                    "study %s stage=delivered to %s (%d/%d object(s) ok) in %.0f ms",
                    study_uid,
                    destination_text,
                    sum(
                        1
                        for r, x in zip(group, results, strict=True)
                        if x.ok and r.study_uid == study_uid
                    ),
                    sum(1 for r in group if r.study_uid == study_uid),
                    (time.perf_counter() - started) * 1e3,
                )
        return sent

    def _mark_failed(self, row: DeliveryRow, error: str, permanent: bool) -> None:
        assert self.worklist is not None
        if self.metrics is not None:
            self.metrics.deliveries_failed.inc()
        try:
            self.worklist.mark_delivery_failed(row.id, error, permanent=permanent)
        except WorklistError as exc:
            logger.error("delivery %d: failure not recorded: %s", row.id, exc)

    # ------------------------------------------------------------------ HTTP API
    def _start_http(self) -> None:
        settings = self.settings
        if not settings.http_port:
            logger.info("HTTP API disabled (http_port = 0)")
            return
        import uvicorn

        from dicom_node.api import create_app

        assert self.worklist is not None
        app = create_app(self.worklist, self.metrics)
        config = uvicorn.Config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="http-api", daemon=True)
        thread.start()
        self.http_server = server
        logger.info("HTTP API on http://%s:%d", settings.http_host, settings.http_port)
