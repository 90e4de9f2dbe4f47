"""Recording a triaged study: its SR, SC and PM written, then its result and deliveries, at once.

The :class:`OutputsRecorder` thread takes what the workers of :mod:`dicom_node.stages.process`
triaged (a short hand-over queue, in the order they did), has the SR and the Grad-CAM's SC and
Parametric Map (``output_maps``) built and written by the outputs process
(:class:`dicom_node.stages.outputs.OutputsProcess`), and records the result and one delivery
row per object and destination in one transaction (whose commit wakes the delivery thread).
A study that cannot be finished is recorded as failed (retried when the error may pass). Each
study is logged once, with its stage timings, by UID. The Device UID of the objects comes
from the model's identity and its weights' digest (:meth:`OutputsRecorder.device_uid`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.stages.outputs import OutputJob, header_only, write_study_outputs
from triage_core.errors import TriageError, WorklistError

if TYPE_CHECKING:
    from dicom_node.metrics import Metrics
    from dicom_node.settings import NodeSettings
    from dicom_node.stages.outputs import OutputsProcess
    from triage_core.pipeline import StudyOutput
    from triage_core.spec import ModelSpec
    from triage_core.worklist import ClaimedStudy, Worklist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessOutcome:
    """What one worker pass over a claimed study did (for tests and benchmarks)."""

    study_uid: str
    status: str
    outputs: tuple[Path, ...] = ()
    seconds: float = 0.0


@dataclass
class Triaged:
    """A study between its worker (inference, Grad-CAM) and the outputs thread."""

    claimed: ClaimedStudy
    out: StudyOutput
    spec: ModelSpec
    started: float
    triaged_at: float
    #: the checkpoint the spec came with: its weights' digest goes into the Device UID
    checkpoint: Path | None = None


class OutputsRecorder:
    """The outputs thread: write, record and count what the workers triaged.

    Parameters
    ----------
    settings : NodeSettings
        ``destinations``, ``outbox_dir``, ``storage``.
    worklist : Worklist
        Where results, deliveries and failures are recorded.
    outputs : OutputsProcess, optional
        Where the SR and SC are built; in this process when omitted (tests).
    metrics : Metrics, optional
    """

    def __init__(
        self,
        settings: NodeSettings,
        worklist: Worklist,
        outputs: OutputsProcess | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.worklist = worklist
        self.outputs = outputs
        self.metrics = metrics
        self.processed = 0
        # triaged studies waiting for their outputs (None: stop); short, for back-pressure
        self._handover: queue.Queue[Triaged | None] = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None
        self._digests: dict[Path, str] = {}  # weights digest by checkpoint

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="triage-outputs", daemon=True)
        self._thread.start()

    def submit(self, triaged: Triaged) -> None:
        """Hand a triaged study over (blocks while two are waiting: back-pressure)."""
        self._handover.put(triaged)

    def stop(self, deadline: float) -> None:
        """Finish what was handed over, then end the thread (by ``deadline``)."""
        if self._thread is None:
            return
        try:
            self._handover.put(None, timeout=max(0.1, deadline - time.monotonic()))
        except queue.Full:
            logger.warning("outputs thread busy at stop; its studies' leases will expire")
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None

    def _loop(self) -> None:
        """Build, write and record what the workers triaged, in the order they did."""
        while True:
            triaged = self._handover.get()
            if triaged is None:
                return
            try:
                self.finish(triaged)
            except Exception:  # noqa: BLE001 - finish records its own errors; never die here
                logger.exception("study %s: outputs failed", triaged.claimed.study_uid)

    def finish(self, triaged: Triaged) -> ProcessOutcome:
        """Outputs, result and deliveries of a triaged study (one transaction), then delivery."""
        claimed, started = triaged.claimed, triaged.started
        study_uid = claimed.study_uid
        waited = time.perf_counter() - triaged.triaged_at
        try:
            outputs = self._write_outputs(triaged)
        except TriageError as exc:
            return self.fail(claimed, f"{exc.__class__.__name__}: {exc}", False, started)
        except Exception as exc:  # noqa: BLE001 - record and retry
            logger.exception("study %s: unexpected error", study_uid)
            return self.fail(claimed, f"{exc.__class__.__name__}: {exc}", True, started)
        result = triaged.out.result
        deliveries = [
            (sop_uid, path, str(destination))
            for sop_uid, path in outputs
            for destination in self.settings.destinations
        ]
        try:
            # result and deliveries in one transaction: a lost lease leaves no orphan delivery
            final = self.worklist.queue.complete_study(
                study_uid, claimed.worker_id, result, deliveries=deliveries
            )
        except WorklistError as exc:
            logger.error("study %s: could not record the result: %s", study_uid, exc)
            return ProcessOutcome(study_uid, "lost-lease", (), time.perf_counter() - started)
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

    def fail(
        self, claimed: ClaimedStudy, error: str, retry: bool, started: float
    ) -> ProcessOutcome:
        """Record that a claimed study failed (``retry``: it goes back to the queue)."""
        try:
            status = self.worklist.queue.fail_study(
                claimed.study_uid, claimed.worker_id, error, retry=retry
            )
        except WorklistError as exc:
            logger.error("study %s: could not record the failure: %s", claimed.study_uid, exc)
            status = "lost-lease"
        logger.error("study %s stage=%s: %s", claimed.study_uid, status, error)
        if self.metrics is not None and status == "failed":
            self.metrics.studies_processed.labels(status="failed").inc()
        return ProcessOutcome(claimed.study_uid, status, (), time.perf_counter() - started)

    def device_uid(self, spec: ModelSpec, checkpoint: Path | None) -> str:
        """The model's Device UID: its identity and its weights' digest (read once per file)."""
        from triage_core.dicom_out import default_device_uid

        if checkpoint is None:
            return default_device_uid(spec, "")
        digest = self._digests.get(checkpoint)
        if digest is None:
            digest = self._digests[checkpoint] = _weights_digest(checkpoint)
            logger.info(
                "model %s: Device UID %s", spec.display_name, default_device_uid(spec, digest)
            )
        return default_device_uid(spec, digest)

    def _write_outputs(self, triaged: Triaged) -> list[tuple[str, Path]]:
        """The SR (and the Grad-CAM SC and PM) of a done study, written to the outbox."""
        out = triaged.out
        if out.result.status != "done":
            return []
        explained = out.cam_finding is not None
        job = OutputJob(
            study_uid=triaged.claimed.study_uid,
            result=out.result,
            sources=tuple(header_only(ds) for ds in out.datasets.values()),
            overlay=out.cam_overlay if explained else None,
            cam_source_uid=out.cam_source_uid,
            cam_finding=out.cam_finding,
            spec=triaged.spec,
            outbox=self.settings.outbox_dir / triaged.claimed.study_uid,
            root=self.settings.storage.resolve(),
            heatmap=out.cam_heatmap if explained else None,
            finding_maps=dict(out.finding_maps),
            output_maps=self.settings.output_maps,
            device_uid=self.device_uid(triaged.spec, triaged.checkpoint),
        )
        started = time.perf_counter()
        if self.outputs is None:
            written, timings = write_study_outputs(job)
        else:
            written, timings = self.outputs.write(job)
        outputs = [(sop_uid, Path(path)) for sop_uid, path in written]
        logger.info(
            "study %s stage=outputs %d object(s) in %.0f ms (SR %.0f ms, SC %.0f ms, "
            "PM %.0f ms, encode+write %.0f ms)",
            job.study_uid,
            len(outputs),
            (time.perf_counter() - started) * 1e3,
            timings["sr"] * 1e3,
            timings["sc"] * 1e3,
            timings["pm"] * 1e3,
            timings["write"] * 1e3,
        )
        return outputs


def _weights_digest(checkpoint: Path) -> str:
    """Digest of the checkpoint's weights file; empty (the spec alone) when it cannot be read."""
    from triage_core.models import weights_digest

    try:
        return weights_digest(checkpoint)
    except OSError as exc:
        logger.warning(
            "weights of %s unreadable (%s): the Device UID follows the spec alone",
            checkpoint.name,
            exc,
        )
        return ""
