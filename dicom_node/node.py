"""A node process: its components, started in order and stopped in reverse.

``triage serve`` (:mod:`dicom_node.cmd_serve`) and ``triage worker``
(:mod:`dicom_node.cmd_worker`) each assemble a :class:`Node` from the components of the data
flow (see DESIGN.md section 1):

=====================  ================================================  =======  ========
component              what it does                                      serve    worker
=====================  ================================================  =======  ========
``Wakeups``            listens for other processes' work (PostgreSQL)    yes      yes
``OutputsProcess``     child process that builds and writes SR and SC    yes      yes
``Processing``         workers: claim -> triage_study -> outputs         yes      yes
``Delivery``           the outbox sender (C-STORE to destinations)       yes      yes
``StableStudies``      queues studies without new instances              yes      no
``Jobs``               expired leases, retention purge                   both     leases
``HttpApi``            read-only JSON API, metrics, health               yes      no
``Receiver``           recovery, C-STORE SCP, spool, instance rows       yes      no
=====================  ================================================  =======  ========

They share the process's :class:`~triage_core.worklist.Worklist`, its
:class:`~dicom_node.metrics.Metrics` and its :class:`~dicom_node.wakeup.Wakeups`. ``serve`` starts
recovery, the DICOM port and the HTTP API first and loads the model in the background (the
outputs process too): C-ECHO and C-STORE are answered, and studies spooled and queued, while the
model loads; ``/healthz/ready`` says when it is serving. The port closes first at stop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dicom_node.delivery import Delivery
from dicom_node.metrics import Metrics
from dicom_node.outputs import OutputsProcess
from dicom_node.processing import Processing
from dicom_node.service import open_worklist
from dicom_node.wakeup import Wakeups

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

    ``background``: the outputs process and the model start in the background (``serve``)."""
    components: list[Component] = [
        parts.wakeups,
        Delivery(parts.settings, parts.worklist, parts.wakeups, parts.metrics),
    ]
    if parts.settings.workers > 0:
        outputs = OutputsProcess(background=background)
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
