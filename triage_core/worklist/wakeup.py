"""Wake-ups instead of polling: "a study is queued", "a delivery is due", "an instance arrived".

Two paths, one API (:class:`Waiter`):

- in the same process, the worklist fires a signal right after the transaction that made work
  commits (threads: workers, the delivery thread, the scheduler);
- across processes on PostgreSQL, the same transaction runs ``NOTIFY`` (delivered at commit), and
  one listener thread per process, on its own connection (``LISTEN``, psycopg 3), fires the local
  signal when a notification arrives. The listener starts with the first waiter of a channel that
  crosses processes, reconnects after a lost connection (waking every waiter once, since
  notifications sent meanwhile are lost) and stops at :meth:`WakeUps.close`. Its connection's
  ``application_name`` is ``cxr-triage-listen``.

A waiter never loses a wake-up between two waits: each signal counts generations, and
:meth:`Waiter.wait` returns at once when the generation moved since the waiter last looked. So
the loop ``claim -> nothing -> wait -> claim`` cannot sleep through work announced during the
claim. The timeout is the fallback (SQLite across processes, a lost notification): callers
always re-check the database after a wait, whatever it returned.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

#: A study became ``queued`` (claimable).
STUDY_QUEUED = "cxr_triage_study"
#: A delivery became due (new, or retried without delay).
DELIVERY_DUE = "cxr_triage_delivery"
#: An instance was recorded (same process only: the scheduler that queues stable studies).
INSTANCE_RECEIVED = "cxr_triage_instance"
#: Channels that cross processes through PostgreSQL NOTIFY.
NOTIFY_CHANNELS: tuple[str, ...] = (STUDY_QUEUED, DELIVERY_DUE)
CHANNELS: tuple[str, ...] = (STUDY_QUEUED, DELIVERY_DUE, INSTANCE_RECEIVED)

_RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)
_POLL_STOP = 0.5  # how often the listener looks at its stop flag while idle


class _Signal:
    """A generation counter under a condition variable."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def fire(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float | None) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen, timeout)
            return self._generation


class Waiter:
    """One consumer's wait on one channel (make one per thread that waits).

    Use ``worklist.queue.waiter()`` (or ``worklist.deliveries.waiter()``,
    ``worklist.queue.instance_waiter()``) rather than building one.
    """

    def __init__(self, channel: str, signal: _Signal, on_wait: Callable[[], None]) -> None:
        self.channel = channel
        self._signal = signal
        self._seen = signal.generation
        self._on_wait = on_wait

    def wait(self, timeout: float | None) -> bool:
        """Block until work was announced on the channel, or ``timeout`` seconds passed.

        Returns at once when something was announced since this waiter was made or since its
        previous :meth:`wait` returned.

        Parameters
        ----------
        timeout : float or None
            Longest wait in seconds (``None``: no limit; use a finite fallback in services).

        Returns
        -------
        bool
            ``True`` when woken by an announcement, ``False`` on timeout.
        """
        self._on_wait()
        generation = self._signal.wait(self._seen, timeout)
        woken = generation != self._seen
        self._seen = generation
        return woken


class WakeUps:
    """The process's signals and (on PostgreSQL) its LISTEN thread.

    Parameters
    ----------
    connect : callable, optional
        Opens a new autocommit psycopg connection to the worklist database; ``None`` (SQLite)
        means signals stay inside the process.
    """

    def __init__(self, connect: Callable[[], Any] | None = None) -> None:
        self._signals = {channel: _Signal() for channel in CHANNELS}
        self._connect = connect
        self._lock = threading.Lock()
        self._listener: _Listener | None = None
        self._pid = os.getpid()
        self._closed = False

    def waiter(self, channel: str) -> Waiter:
        """A new :class:`Waiter` on ``channel`` (one of :data:`CHANNELS`)."""
        if channel not in self._signals:
            raise ValueError(f"unknown channel {channel!r}; use one of {CHANNELS}")
        on_wait = self._ensure_listener if channel in NOTIFY_CHANNELS else _nothing
        return Waiter(channel, self._signals[channel], on_wait)

    def fire(self, channels: Iterable[str]) -> None:
        """Wake this process's waiters on ``channels`` (call after the commit)."""
        for channel in channels:
            signal = self._signals.get(channel)
            if signal is not None:
                signal.fire()

    def start(self, timeout: float = 5.0) -> bool:
        """Start listening now (PostgreSQL) and wait until ``LISTEN`` is in effect.

        Waiters start the listener on their first wait anyway; a worker process calls this
        once at start so that no notification sent during its start-up is missed.

        Returns
        -------
        bool
            ``True`` when listening (or on SQLite, where nothing crosses processes).
        """
        if self._connect is None:
            return True
        self._ensure_listener()
        listener = self._listener
        return listener is not None and listener.ready.wait(timeout)

    @property
    def listening(self) -> bool:
        """Whether this process's LISTEN connection is up."""
        listener = self._listener
        return listener is not None and listener.is_alive() and listener.ready.is_set()

    def _ensure_listener(self) -> None:
        if self._connect is None:
            return
        with self._lock:
            if self._closed:  # after close(), waiters fall back to their timeouts
                return
            if self._pid != os.getpid():  # forked: the parent's thread does not exist here
                self._pid, self._listener = os.getpid(), None
            if self._listener is None or not self._listener.is_alive():
                self._listener = _Listener(self._connect, self.fire)
                self._listener.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the listener thread (if any) and wait for it; no listener starts afterwards."""
        with self._lock:
            listener, self._listener = self._listener, None
            self._closed = True
        if listener is not None and listener.is_alive():
            listener.stop.set()
            listener.join(timeout)


def _nothing() -> None:
    return None


class _Listener(threading.Thread):
    """``LISTEN`` on :data:`NOTIFY_CHANNELS` and fire the local signals on each notification."""

    def __init__(self, connect: Callable[[], Any], fire: Callable[[Iterable[str]], None]) -> None:
        super().__init__(name="worklist-listen", daemon=True)
        self._open = connect
        self._fire = fire
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        import psycopg
        from psycopg import sql

        failures = 0
        while not self.stop.is_set():
            try:
                with self._open() as conn:
                    for channel in NOTIFY_CHANNELS:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if failures:
                        logger.info("worklist LISTEN connection restored")
                    # Notifications sent before LISTEN took effect are lost: every waiter looks
                    # at the database once more (this also closes the gap at start-up).
                    self._fire(NOTIFY_CHANNELS)
                    self.ready.set()
                    failures = 0
                    while not self.stop.is_set():
                        for note in conn.notifies(timeout=_POLL_STOP):
                            self._fire((note.channel,))
            except psycopg.Error as exc:
                self.ready.clear()
                delay = _RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)]
                failures += 1
                logger.warning("worklist LISTEN connection lost (%s); retry in %.1f s", exc, delay)
                self.stop.wait(delay)
        self.ready.clear()
