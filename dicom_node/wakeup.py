"""Wake-ups: how the workers and the delivery thread learn that there is work, without polling.

A :class:`Wakeups` object has one :class:`Signal` per kind of work: ``studies`` (a study was
queued or requeued: workers claim) and ``deliveries`` (result objects are due: the delivery
thread sends). Whoever makes work notifies the signal in-process; across processes a *source*
(PostgreSQL ``LISTEN``, see :meth:`Wakeups.add_source`) turns the database's notifications into
the same calls. Waiters still wake after ``fallback`` seconds, as a safety net for a missed
notification and for work that becomes due with time (delivery backoff); that period is long
when every producer can notify (one process, or a source attached) and short otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger(__name__)

STUDIES = "studies"
DELIVERIES = "deliveries"
TOPICS = (STUDIES, DELIVERIES)


class Signal:
    """A wake-up that no waiter can miss.

    A waiter takes :meth:`mark` *before* it looks for work and passes it to :meth:`wait`, which
    returns at once if :meth:`notify` was called since: a notification that arrives while the
    waiter is busy looking is not lost (a plain ``threading.Event`` cleared by one waiter would
    lose it for the others).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def mark(self) -> int:
        with self._cond:
            return self._generation

    def notify(self) -> None:
        """Wake every waiter."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, mark: int, timeout: float) -> bool:
        """Block until a notification newer than ``mark`` or ``timeout`` s; True if notified."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != mark, timeout)


class Source(Protocol):
    """Turns another process's notifications into :meth:`Wakeups.notify` calls."""

    def start(self, notify: Callable[[str], None]) -> None: ...

    def stop(self) -> None: ...


class Wakeups:
    """The process's wake-up signals (``studies``, ``deliveries``) and their sources.

    Parameters
    ----------
    fallback : float
        Seconds after which a waiter looks for work even without a notification.
    """

    def __init__(self, fallback: float) -> None:
        self.studies = Signal()
        self.deliveries = Signal()
        self.fallback = fallback
        self._sources: list[Source] = []

    def signal(self, topic: str) -> Signal:
        if topic == STUDIES:
            return self.studies
        if topic == DELIVERIES:
            return self.deliveries
        raise ValueError(f"unknown wake-up topic {topic!r}; use one of {', '.join(TOPICS)}")

    def notify(self, topic: str) -> None:
        """Wake the waiters of ``topic`` (``studies`` or ``deliveries``)."""
        self.signal(topic).notify()

    def notify_all(self) -> None:
        """Wake everyone (at stop, so that waiters see their stop flag at once)."""
        for topic in TOPICS:
            self.signal(topic).notify()

    def add_source(self, source: Source, fallback: float | None = None) -> None:
        """Start ``source`` (e.g. a PostgreSQL listener); optionally lengthen the fallback."""
        source.start(self.notify)
        self._sources.append(source)
        if fallback is not None:
            self.fallback = fallback

    def close(self) -> None:
        for source in self._sources:
            try:
                source.stop()
            except Exception:  # noqa: BLE001 - stopping must go on with the next source
                logger.exception("wake-up source did not stop cleanly")
        self._sources = []
        self.notify_all()
