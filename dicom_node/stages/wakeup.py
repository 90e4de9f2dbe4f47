"""Wake-ups: how the node's threads learn that there is work, without polling the database.

The worklist announces work itself, right after the commit that made it
(:mod:`triage_core.worklist.wakeup`): a study became claimable (queued, re-queued after a
failure or an expired lease), a delivery became due (a study completed with outputs), an
instance was recorded. In one process that is a signal; across processes on PostgreSQL the same
transaction runs ``NOTIFY`` and one ``LISTEN`` thread per process turns it into the signal.

:class:`Wakeups` is the node's side of it, the one object the threads wait through:

* each waiting thread makes its waiter once (:meth:`Wakeups.study_waiter` for the workers,
  :meth:`~Wakeups.delivery_waiter` for the delivery thread, :meth:`~Wakeups.instance_waiter`
  for stable-study detection) and, after each look at the database, waits on it; a waiter never
  misses an announcement made while its thread was looking;
* every wait is bounded by :attr:`Wakeups.fallback`, the safety net for what cannot be announced
  (another process on SQLite, a notification lost while the LISTEN connection was down):
  :data:`IDLE_FALLBACK` when every producer can announce, ``scheduler_interval`` otherwise;
* :meth:`Wakeups.wake_all` wakes every waiter of the process (at stop, so that threads see their
  stop flag at once).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, ClassVar

from triage_core.worklist.wakeup import CHANNELS

if TYPE_CHECKING:
    from triage_core.worklist import Worklist
    from triage_core.worklist.wakeup import Waiter

logger = logging.getLogger(__name__)

#: Safety-net period of the waits when every producer of work announces it (seconds).
IDLE_FALLBACK = 5.0

#: Shortest wait between two looks (guards against a busy loop on clock skew).
MIN_WAIT = 0.01

#: Wait after a failed look at the database (it may say work is due that cannot be taken).
ERROR_WAIT = 1.0


class Wakeups:
    """The wake-ups of one node process (see the module docstring).

    Parameters
    ----------
    worklist : Worklist
        The process's worklist, which announces work after its commits.
    shared : bool
        Whether other processes may make work (a PostgreSQL database): then :meth:`start`
        listens for their notifications, and without them waiters look every ``poll``
        seconds.
    poll : float
        Fallback period when another process's work cannot be announced.
    """

    def __init__(self, worklist: Worklist, *, shared: bool, poll: float) -> None:
        self.worklist = worklist
        self.shared = shared
        self.poll = poll
        self.fallback = poll if shared else IDLE_FALLBACK

    def start(self) -> None:
        """Listen for other processes' notifications (PostgreSQL) before work is claimed."""
        if not self.shared:
            return
        if self.worklist.start_listening():
            self.fallback = IDLE_FALLBACK
            logger.info("wake-ups: listening for the database's notifications")
        else:
            self.fallback = self.poll
            logger.warning(
                "wake-ups: the database's notifications are not available; looking for work "
                "every %.1f s",
                self.poll,
            )

    def stop(self, deadline: float) -> None:
        self.wake_all()

    def study_waiter(self) -> Waiter:
        """For a worker thread: woken when a study becomes claimable."""
        return self.worklist.queue.waiter()

    def delivery_waiter(self) -> Waiter:
        """For the delivery thread: woken when a delivery becomes due now."""
        return self.worklist.deliveries.waiter()

    def instance_waiter(self) -> Waiter:
        """For stable-study detection: woken when this process records an instance."""
        return self.worklist.queue.instance_waiter()

    def bounded(self, seconds: float | None) -> float:
        """A wait of ``seconds`` (``None``: nothing expected) within the fallback period."""
        if seconds is None:
            return self.fallback
        return max(MIN_WAIT, min(seconds, self.fallback))

    def wake_all(self) -> None:
        """Wake every waiter of this process."""
        self.worklist.wakeups.fire(CHANNELS)


class WokenThread:
    """A component that runs :meth:`_run` in one daemon thread until :meth:`stop`, which sets
    ``_stop`` and wakes every waiter so the thread sees it at once (delivery, stable studies)."""

    thread_name: ClassVar[str]

    def __init__(self, wakeups: Wakeups) -> None:
        self.wakeups = wakeups
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, deadline: float) -> None:
        self._stop.set()
        self.wakeups.wake_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError
