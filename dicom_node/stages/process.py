"""The processing stage: worker threads claim a study and triage it; the recorder records it.

* Each worker thread claims a queued study (a lease), runs
  :func:`triage_core.pipeline.triage_study` (inference and Grad-CAM from the same pass) and
  hands the result to the outputs recorder (:class:`dicom_node.stages.record.OutputsRecorder`),
  then claims the next study. When nothing is queued it sleeps until the worklist announces a
  claimable study (:mod:`dicom_node.stages.wakeup`), not on a poll.
* The recorder's thread has the SR and SC written and records the result and the deliveries
  in one transaction (see :mod:`dicom_node.stages.record`).
* One :class:`LeaseKeeper` thread per process renews the leases of all its workers at once.

The worker threads share one :class:`~triage_core.inference.Predictor` (forward passes are
serialised by its lock; Grad-CAM runs on the explainer's private copy of the model). Every
study stage is logged once, with its duration, by UID (never patient identifiers).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.stages.model import load_predictor
from dicom_node.stages.record import OutputsRecorder, ProcessOutcome, Triaged
from triage_core.errors import TriageError, WorklistError

if TYPE_CHECKING:
    from dicom_node.metrics import Metrics
    from dicom_node.settings import NodeSettings
    from dicom_node.stages.outputs import OutputsProcess
    from dicom_node.stages.wakeup import Wakeups
    from triage_core.inference import Predictor
    from triage_core.worklist import ClaimedStudy, Worklist

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """One thread that renews the leases of every worker thread of this process.

    Every third of the lease, one statement
    (:meth:`~triage_core.worklist.queue.Leases.renew_leases`) extends each lease held by one of
    ``worker_ids``; a study whose lease expired and was recovered elsewhere is no longer held
    and is not renewed (its worker learns it when it completes). A process that died stops
    renewing: its studies go back to the queue after at most one lease.
    """

    def __init__(self, worklist: Worklist, worker_ids: list[str], lease_seconds: float) -> None:
        self._worklist = worklist
        self.worker_ids = worker_ids
        self._lease = lease_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def renew_all(self) -> list[str]:
        """Renew every lease of this process now; returns the studies renewed."""
        try:
            return self._worklist.leases.renew_leases(self.worker_ids, self._lease)
        except WorklistError as exc:
            logger.warning("lease renewal failed: %s", exc)
            return []

    def _run(self) -> None:
        while not self._stop.wait(max(0.5, self._lease / 3)):
            self.renew_all()


class Processing:
    """Worker threads, the outputs thread and the lease keeper of one process.

    Parameters
    ----------
    settings : NodeSettings
        ``workers``, ``lease_seconds``, ``with_cam``, ``sc_max_side``, ``destinations``,
        ``outbox_dir``, ``storage``.
    worklist : Worklist
        The process's worklist.
    wakeups : Wakeups
        What idle workers wait on (a study becoming claimable).
    node_id : str
        Prefix of the worker ids (``NODE/w0``...) that hold the leases.
    model_path : Path, optional
        Checkpoint loaded by :meth:`start` (``None``: the default checkpoint).
    predictor : Predictor, optional
        An already loaded model (tests); shared by the worker threads.
    outputs : OutputsProcess, optional
        Where the SR and SC are built; in this process when omitted (tests).
    metrics : Metrics, optional
    background : bool
        :meth:`start` returns at once and the model is loaded in a thread, which then starts
        the workers (``triage serve``: the port and the HTTP API do not wait for the model;
        studies received meanwhile are spooled and queued). :meth:`readiness` tells.
    """

    def __init__(
        self,
        settings: NodeSettings,
        worklist: Worklist,
        wakeups: Wakeups,
        node_id: str,
        *,
        model_path: Path | None = None,
        predictor: Predictor | None = None,
        outputs: OutputsProcess | None = None,
        metrics: Metrics | None = None,
        background: bool = False,
    ) -> None:
        self.settings = settings
        self.background = background
        self._loader: threading.Thread | None = None
        self._load_error: str | None = None
        self._start_lock = threading.Lock()
        self.worklist = worklist
        self.model_path = model_path
        self._predictor = predictor
        self.wakeups = wakeups
        self.node_id = node_id
        self.recorder = OutputsRecorder(settings, worklist, outputs, metrics)
        self.worker_ids = [f"{node_id}/w{index}" for index in range(settings.workers)]
        self.leases = LeaseKeeper(worklist, self.worker_ids, settings.lease_seconds)
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    # ------------------------------------------------------------------ life cycle
    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:
            raise RuntimeError("no model loaded: start() first, or pass a predictor")
        return self._predictor

    @property
    def processed(self) -> int:
        """Studies whose result this process recorded."""
        return self.recorder.processed

    def readiness(self) -> str:
        """``ready`` (workers running), ``loading`` or ``failed: <reason>`` (the model)."""
        if self._load_error is not None:
            return f"failed: {self._load_error}"
        return "ready" if self._workers else "loading"

    def start(self) -> None:
        """Load and warm up the model, then start the lease keeper, outputs and workers
        (with ``background``: in a thread, and return at once)."""
        if self._predictor is None and self.background:
            self._loader = threading.Thread(
                target=self._load_and_start, name="model-loader", daemon=True
            )
            self._loader.start()
            return
        if self._predictor is None:
            self._predictor = load_predictor(self.settings, self.model_path)
        self._start_threads()

    def _load_and_start(self) -> None:
        try:
            predictor = load_predictor(self.settings, self.model_path)
        except Exception as exc:  # noqa: BLE001 - reported by readiness and the log; ingest goes on
            self._load_error = f"{exc.__class__.__name__}: {exc}"
            logger.error(
                "the model could not be loaded (%s): studies are received and queued, none is "
                "processed",
                self._load_error,
            )
            return
        with self._start_lock:
            self._predictor = predictor
            if not self._stop.is_set():
                self._start_threads()

    def _start_threads(self) -> None:
        self.leases.start()
        self.recorder.start()
        for index, worker_id in enumerate(self.worker_ids):
            thread = threading.Thread(
                target=self._worker_loop,
                args=(worker_id,),
                name=f"triage-worker-{index}",
                daemon=True,
            )
            thread.start()
            self._workers.append(thread)

    def stop(self, deadline: float) -> None:
        """Let the workers finish their study and the outputs thread what it was handed."""
        with self._start_lock:
            self._stop.set()
        self.wakeups.wake_all()
        if self._loader is not None:  # a load in progress ends without starting workers
            self._loader.join(max(0.0, deadline - time.monotonic()))
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._workers = [t for t in self._workers if t.is_alive()]
        self.recorder.stop(deadline)
        self.leases.stop()

    # ------------------------------------------------------------------ threads
    def _worker_loop(self, worker_id: str) -> None:
        """Claim a study, triage it (inference + Grad-CAM), hand it to the outputs thread.

        The outputs thread builds, writes and records the study while this thread already
        claims, decodes and infers the next one (torch releases the GIL during the forward
        pass, so the two overlap on two cores). The hand-over queue is short: a worker never
        runs more than a couple of studies ahead of their outputs.
        """
        waiter = self.wakeups.study_waiter()  # a study queued during the claim wakes it too
        while not self._stop.is_set():
            try:
                claimed = self.worklist.queue.claim_study(worker_id, self.settings.lease_seconds)
            except WorklistError as exc:
                logger.error("%s: claim failed: %s", worker_id, exc)
                self._stop.wait(1.0)
                continue
            if claimed is None:
                waiter.wait(self.wakeups.fallback)
                continue
            triaged = self.triage(claimed)
            if isinstance(triaged, Triaged):
                self.recorder.submit(triaged)

    # ------------------------------------------------------------------ one study
    def process_claimed(self, claimed: ClaimedStudy) -> ProcessOutcome:
        """Triage one claimed study, write outputs, add deliveries and complete it (one call)."""
        triaged = self.triage(claimed)
        if isinstance(triaged, ProcessOutcome):
            return triaged
        return self.recorder.finish(triaged)

    def triage(self, claimed: ClaimedStudy) -> Triaged | ProcessOutcome:
        """Inference and Grad-CAM of a claimed study; its lease is kept until it is finished."""
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
        try:
            out = triage_study(
                study_uid,
                list(claimed.instances),
                self.predictor,
                with_cam=self.settings.with_cam,
                cam_max_side=self.settings.sc_max_side or None,
            )
        except TriageError as exc:
            # A deterministic problem with this study's data: retrying would fail again.
            return self.recorder.fail(claimed, f"{exc.__class__.__name__}: {exc}", False, started)
        except Exception as exc:  # noqa: BLE001 - record and retry; the worker must keep going
            logger.exception("study %s: unexpected error", study_uid)
            return self.recorder.fail(claimed, f"{exc.__class__.__name__}: {exc}", True, started)
        return Triaged(
            claimed, out, self.predictor.spec, started, time.perf_counter(),
            checkpoint=self.predictor.checkpoint,
        )  # fmt: skip
