"""A node process: its components, started in order and stopped in reverse.

:func:`build_serve_node` (``triage serve``) and :func:`build_worker_node` (``triage worker``)
each assemble a :class:`Node` from the components of the data flow (:mod:`dicom_node.stages`
and the HTTP server of :mod:`dicom_node.web`; see DESIGN.md section 1), on the worklist
:func:`open_worklist` opens:

=====================  ================================================  =======  ========
component              what it does                                      serve    worker
=====================  ================================================  =======  ========
``Wakeups``            listens for other processes' work (PostgreSQL)    yes      yes
``OutputsProcess``     child process that builds and writes SR and SC    yes      yes
``Processing``         workers: claim -> triage_study -> the recorder    yes      yes
``Delivery``           the outbox sender (C-STORE or STOW-RS)            yes      yes
``StableStudies``      queues studies without new instances              yes      no
``Jobs``               expired leases, retention purge                   both     leases
``HttpApi``            read-only JSON API, metrics, health               yes      no
``Receiver``           recovery, C-STORE SCP, spool, instance rows       yes      no
=====================  ================================================  =======  ========

They share the process's :class:`~triage_core.worklist.Worklist`, its
:class:`~dicom_node.metrics.Metrics` and its :class:`~dicom_node.stages.wakeup.Wakeups`. ``serve``
starts recovery, the DICOM port and the HTTP API first and loads the model in the background (the
outputs process too): C-ECHO and C-STORE are answered, and studies spooled and queued, while the
model loads; ``/healthz/ready`` says when it is serving. The port closes first at stop.

:func:`run_until_signal` is the life of either: build, start, serve until SIGTERM or SIGINT,
stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicom_node.metrics import Metrics
from dicom_node.stages.deliver import Delivery
from dicom_node.stages.outputs import OutputsProcess
from dicom_node.stages.process import Processing
from dicom_node.stages.wakeup import Wakeups

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)


class Component(Protocol):
    """A part of a node with a life cycle."""

    def start(self) -> None: ...

    def stop(self, deadline: float) -> None: ...


def new_node_id() -> str:
    """``host:pid:random``, the prefix of this process's lease holders."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


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


def make_wakeups(settings: NodeSettings, worklist: Worklist) -> Wakeups:
    """The wake-ups of a process: PostgreSQL may be shared with other processes (then their
    notifications are listened for); with SQLite every producer of work is in this process."""
    shared = not settings.database_url.startswith("sqlite")
    return Wakeups(worklist, shared=shared, poll=settings.scheduler_interval)


@dataclass
class NodeParts:
    """What the components of a node share."""

    settings: NodeSettings
    worklist: Worklist
    metrics: Metrics
    wakeups: Wakeups
    node_id: str


def open_parts(settings: NodeSettings) -> NodeParts:
    """Open the worklist (schema created if needed) and the shared objects."""
    worklist = open_worklist(settings)
    logger.info("worklist %s", settings.redacted_url())
    wakeups = make_wakeups(settings, worklist)
    return NodeParts(settings, worklist, Metrics(worklist), wakeups, new_node_id())


def processing_components(
    parts: NodeParts, model_path: Path | None, *, background: bool = False
) -> list[Component]:
    """Wake-ups, delivery thread, outputs process and workers (none when ``workers = 0``).

    ``background`` (``serve``): the model loads in the background and the outputs process is
    spawned by the first study that needs it."""
    components: list[Component] = [
        parts.wakeups,
        Delivery(parts.settings, parts.worklist, parts.wakeups, parts.metrics),
    ]
    if parts.settings.workers > 0:
        outputs = OutputsProcess(on_demand=background)
        components += [
            outputs,
            Processing(
                parts.settings,
                parts.worklist,
                parts.wakeups,
                parts.node_id,
                model_path=model_path,
                outputs=outputs,
                metrics=parts.metrics,
                background=background,
            ),
        ]
    return components


class Node:
    """Components started in order, stopped in reverse, then the worklist closed.

    Parameters
    ----------
    name : str
        ``serve`` or ``worker``, for the log.
    parts : NodeParts
        The shared worklist, metrics and wake-ups (closed by :meth:`stop`).
    components : sequence of Component
        In start order.
    stop_first : sequence of Component
        Stopped before the others (the ingest port: nothing new arrives while the rest stops).
    """

    def __init__(
        self,
        name: str,
        parts: NodeParts,
        components: Sequence[Component],
        stop_first: Sequence[Component] = (),
    ) -> None:
        self.name = name
        self.parts = parts
        self.components = list(components)
        self.stop_first = list(stop_first)
        self._started: list[Component] = []
        self._stop = threading.Event()

    def start(self) -> None:
        for component in self.components:
            component.start()
            self._started.append(component)
        settings = self.parts.settings
        logger.info(
            "%s %s started: %d worker(s), destinations: %s",
            self.name,
            self.parts.node_id,
            settings.workers,
            ", ".join(str(d) for d in settings.destinations) or "none",
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop what was started (last first), then close the worklist."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        self.parts.wakeups.wake_all()
        first = [c for c in self._started if c in self.stop_first]
        self._started = [c for c in self._started if c not in self.stop_first] + first
        while self._started:
            component = self._started.pop()
            try:
                component.stop(deadline)
            except Exception:  # noqa: BLE001 - the other components must still stop
                logger.exception("%s did not stop cleanly", type(component).__name__)
        self.parts.worklist.dispose()  # stops the LISTEN thread too
        logger.info("%s %s stopped", self.name, self.parts.node_id)

    def wait(self) -> None:
        """Block until :meth:`request_stop` is called."""
        while not self._stop.wait(0.5):
            pass

    def request_stop(self) -> None:
        self._stop.set()


def build_serve_node(settings: NodeSettings, model_path: Path | None) -> Node:
    """``triage serve``: jobs, the HTTP API, delivery, recovery and the DICOM port, then the
    model, which loads in the background (``/healthz/ready`` tells when it has: not the C-ECHO
    answer); the outputs process starts with the first study's outputs."""
    from dicom_node.stages.jobs import Jobs, StableStudies, lease_job, purge_job
    from dicom_node.stages.receive import Receiver
    from dicom_node.web.server import HttpApi

    parts = open_parts(settings)
    worklist = parts.worklist
    jobs = [lease_job(settings, worklist)]
    if settings.retention_days:
        jobs.append(purge_job(settings, worklist))
    wakeups, delivery, *processing = processing_components(parts, model_path, background=True)
    workers = next((c for c in processing if isinstance(c, Processing)), None)
    readiness = workers.readiness if workers is not None else None
    receiver = Receiver(settings, worklist, parts.metrics)  # STOW-RS shares its receive path
    components = [
        wakeups,
        StableStudies(settings, worklist, parts.wakeups),
        Jobs(jobs),
        HttpApi(
            settings, worklist, parts.metrics, store=lambda: receiver.store, readiness=readiness
        ),
        delivery,
        receiver,  # recovery, then the DICOM port: a C-ECHO answer means listening, not ready
        *processing,  # then the model loads in the background
    ]
    return Node("serve", parts, components, stop_first=[receiver])


def build_worker_node(settings: NodeSettings, model_path: Path | None) -> Node:
    """``triage worker``: outputs, workers, delivery and the expired-lease job (no port)."""
    from dicom_node.stages.jobs import Jobs, lease_job

    parts = open_parts(settings)
    components = [
        *processing_components(parts, model_path),
        Jobs([lease_job(settings, parts.worklist)]),
    ]
    return Node("worker", parts, components)


class StartError(Exception):
    """A node could not be built or started; the cause (a ``TriageError`` or ``OSError``) is
    ``__cause__``. What had started is stopped."""


def run_until_signal(build: Callable[[], Node], started: Callable[[], None]) -> None:
    """Build and start a node, call ``started``, serve until SIGTERM or SIGINT, then stop it.

    The signal handlers are installed first: a signal while the node starts stops it as soon
    as it has started.

    Raises
    ------
    StartError
        ``build`` or :meth:`Node.start` raised a ``TriageError`` or an ``OSError``.
    """
    from triage_core.errors import TriageError

    stop_requested = threading.Event()
    node: Node | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        stop_requested.set()
        if node is not None:
            node.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node = build()
        node.start()
    except (TriageError, OSError) as exc:
        if node is not None:
            node.stop()
        raise StartError(str(exc)) from exc
    started()
    if stop_requested.is_set():
        node.request_stop()
    try:
        node.wait()
    finally:
        node.stop()
