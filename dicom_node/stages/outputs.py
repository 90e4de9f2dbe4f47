"""The outputs stage: a done study's SR, Grad-CAM SC and PM, built and written in a child process.

:func:`write_study_outputs` builds the SR (:class:`triage_core.dicom_out.ReportBuilder`, with
an image region per finding judged present, :func:`triage_core.dicom_out.cam_region`), the SC
(:func:`triage_core.dicom_out.build_sc`) and the Parametric Map
(:func:`triage_core.dicom_out.build_pm`), as ``output_maps`` says, and writes them durably under
``STORAGE/outbox/<study>/``. That is pure-Python work (highdicom, pydicom encoding) that would
hold the workers' GIL while they infer, so :class:`OutputsProcess` runs it in one spawned child
(no torch in it), restarted if it dies.

The child never outlives its parent: it opens a pidfd on the parent at start and a watcher
thread exits the child the moment the parent is gone, SIGKILL included (without it the child
waited forever on the executor's queue, whose pipe it holds both ends of). We do not rely on
``PR_SET_PDEATHSIG``: it fires when the *thread* that spawned the child exits, and the child
may be respawned by a short-lived thread. Multiprocessing's resource tracker (started by the
"spawn" method) exits by itself once every process holding its pipe, parent and child, is gone.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import select
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import logsafe
from dicom_node.ingest.durable import write_durable

if TYPE_CHECKING:
    import numpy as np
    import pydicom

    from triage_core.dicom_out import ReportBuilder
    from triage_core.spec import Finding, ModelSpec, StudyResult

logger = logging.getLogger(__name__)

#: Seconds the outputs process may take to start (imports of highdicom and our builders).
START_TIMEOUT = 300.0


@dataclass(frozen=True)
class OutputJob:
    """What :func:`write_study_outputs` needs (picklable: it runs in another process)."""

    study_uid: str
    result: StudyResult
    sources: tuple[pydicom.Dataset, ...]  # header-only copies of the study's images
    overlay: np.ndarray | None
    cam_source_uid: str
    cam_finding: Finding | None
    spec: ModelSpec
    outbox: Path
    root: Path
    heatmap: np.ndarray | None = None  # the overlay's map, [0, 1] (the Parametric Map)
    finding_maps: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    output_maps: str = "both"  # "both", "sc" or "pm" (NodeSettings.output_maps)
    device_uid: str | None = None  # None: the spec's default


#: Written objects ``[(SOP Instance UID, path)]`` and seconds spent on ``sr``, ``sc``, ``pm``,
#: ``write``.
OutputsWritten = tuple[list[tuple[str, str]], dict[str, float]]

#: What ``output_maps`` may say, and the maps each sends.
OUTPUT_MAPS = {"both": ("sc", "pm"), "sc": ("sc",), "pm": ("pm",)}

#: The outputs process's report builder (one model per service: rebuilt if the model changes).
_REPORT_BUILDERS: list[ReportBuilder] = []


def _report_builder(spec: ModelSpec, device_uid: str | None) -> ReportBuilder:
    from triage_core.dicom_out import ReportBuilder

    builder = _REPORT_BUILDERS[0] if _REPORT_BUILDERS else None
    stale = builder is None or builder.spec != spec
    if builder is not None and device_uid is not None and device_uid != builder.device_uid:
        stale = True
    if stale:
        _REPORT_BUILDERS[:] = [ReportBuilder(spec, device_uid)]
    return _REPORT_BUILDERS[0]


def _regions(job: OutputJob) -> dict[str, Any]:
    """The image region of each finding judged present whose map was computed."""
    from triage_core.dicom_out import cam_region

    by_uid = {str(ds.SOPInstanceUID): ds for ds in job.sources}
    present = {f.name for f in job.result.findings if f.present}
    regions = {}
    for name, (source_uid, heatmap) in job.finding_maps.items():
        source = by_uid.get(source_uid)
        if name not in present or source is None:
            continue
        region = cam_region(heatmap, int(source.Rows), int(source.Columns), source_uid)
        if region is not None:
            regions[name] = region
    return regions


def write_study_outputs(job: OutputJob) -> OutputsWritten:
    """Build the SR, the Grad-CAM SC and PM (``job.output_maps``) of a done study and write them
    durably under ``job.outbox``, SR first.

    Returns ``[(SOP Instance UID, path)]`` and the seconds spent on ``sr``, ``sc``, ``pm`` and
    ``write`` (encode + write + fsync).

    Raises
    ------
    ValueError
        ``job.output_maps`` is not one of :data:`OUTPUT_MAPS`.
    """
    from triage_core.dicom_out import build_pm, build_sc

    if job.output_maps not in OUTPUT_MAPS:
        raise ValueError(f"output_maps {job.output_maps!r}: expected one of {list(OUTPUT_MAPS)}")
    maps = OUTPUT_MAPS[job.output_maps]
    t0 = time.perf_counter()
    builder = _report_builder(job.spec, job.device_uid)
    objects = [builder.build(job.result, list(job.sources), regions=_regions(job))]
    t_sr = time.perf_counter()
    source = next((ds for ds in job.sources if ds.SOPInstanceUID == job.cam_source_uid), None)
    finding = job.cam_finding
    if "sc" in maps and job.overlay is not None and finding is not None and source is not None:
        objects.append(
            build_sc(job.overlay, source, finding, job.spec, device_uid=builder.device_uid)
        )
    t_sc = time.perf_counter()
    if "pm" in maps and job.heatmap is not None and finding is not None and source is not None:
        objects.append(
            build_pm(job.heatmap, source, finding, job.spec, device_uid=builder.device_uid)
        )
    t_pm = time.perf_counter()
    written = []
    for ds in objects:  # the SR first: it is delivered first too
        sop_uid = str(ds.SOPInstanceUID)
        path = job.outbox / f"{sop_uid}.dcm"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        write_durable(path, [buffer.getbuffer()], job.root)
        written.append((sop_uid, str(path)))
    timings = {
        "sr": t_sr - t0,
        "sc": t_sc - t_sr,
        "pm": t_pm - t_sc,
        "write": time.perf_counter() - t_pm,
    }
    return written, timings


def header_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds`` without pixel data (cheap to send to the outputs process)."""
    import pydicom

    header = pydicom.Dataset()
    header.update({elem.tag: elem for elem in ds if elem.tag.group != 0x7FE0})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


# ---------------------------------------------------------------------- parent watch (child)
def watch_parent(parent_pid: int) -> None:
    """Exit this process as soon as ``parent_pid`` is gone (call first thing in a child).

    A pidfd becomes readable when its process exits, so the watcher thread sleeps in
    ``select`` and costs nothing; where pidfds are missing (Linux < 5.3) it polls
    ``os.getppid()`` once a second. ``os._exit``: nothing of a half-done job is worth keeping
    (outputs are written to a temporary name and renamed, a lost job is redone by the study's
    next worker).
    """
    try:
        pidfd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        pidfd = -1
    if os.getppid() != parent_pid:  # the parent died before we could watch it
        os._exit(1)

    def wait_for_parent() -> None:
        if pidfd >= 0:
            select.select([pidfd], [], [])
        else:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=wait_for_parent, name="parent-watch", daemon=True).start()


def _init_outputs_process(
    parent_pid: int, log_config: tuple[int, bool] = (logging.WARNING, False)
) -> None:
    """Initializer of the outputs process: watch the parent, PHI-safe logging (highdicom's
    warnings, which quote person names, are raised here), then pay the imports once."""
    watch_parent(parent_pid)
    from dicom_node import logsafe

    logsafe.install(*log_config)
    import highdicom  # noqa: F401

    from triage_core import dicom_out  # noqa: F401


def _ready() -> int:
    return os.getpid()


# ---------------------------------------------------------------------- the process (parent)
class OutputsProcess:
    """One spawned child that runs :func:`write_study_outputs` (no torch, no GIL of ours).

    :meth:`start` spawns it and waits until its imports are done. With ``on_demand`` (``triage
    serve``) it spawns nothing: the first :meth:`write` does (and its job queues behind the
    child's imports), so an idle node holds no child (about 80 MB with multiprocessing's
    resource tracker) and the first study's outputs wait a few seconds longer. :meth:`write`
    runs one job there and respawns the child if it died; :meth:`stop` ends it. ``pid`` is the
    child's process id once it is ready (for tests).
    """

    def __init__(self, on_demand: bool = False) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._spawn_lock = threading.Lock()  # one first write spawns, the others wait for it
        self._started = False
        self.on_demand = on_demand
        self.pid: int | None = None

    def start(self) -> None:
        self._started = True
        if not self.on_demand:
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            old, self._pool = self._pool, None
            if old is not None:
                old.shutdown(wait=False, cancel_futures=True)
            started = time.perf_counter()
            pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_outputs_process,
                initargs=(os.getpid(), logsafe.current_config()),
            )
            ready = pool.submit(_ready)
            self._pool = pool

        def report(future: Future[int]) -> None:
            if future.cancelled() or future.exception() is not None:
                return  # a broken child is reported (and replaced) by the next write
            self.pid = future.result()
            logger.info(
                "outputs process %d ready in %.1f s", self.pid, time.perf_counter() - started
            )

        if self.on_demand:  # the write that spawned it waits on its job, not here
            ready.add_done_callback(report)
        else:
            ready.result(timeout=START_TIMEOUT)
            report(ready)

    def write(self, job: OutputJob) -> OutputsWritten:
        """Run ``job`` in the child; a dead child is replaced (and this job's error raised)."""
        pool = self._pool
        if pool is None and self._started:
            with self._spawn_lock:
                if self._pool is None:
                    self._spawn()  # on demand: the first write
                pool = self._pool
        if pool is None:
            raise RuntimeError("the outputs process is not started")
        try:
            return pool.submit(write_study_outputs, job).result()
        except BrokenProcessPool:
            logger.error("the outputs process died; starting a new one")
            self._spawn()
            raise

    def stop(self, deadline: float | None = None) -> None:
        """Let the child finish its job and exit (``deadline`` unused: jobs are short)."""
        self._started = False
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
