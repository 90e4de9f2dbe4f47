"""The delivery stage: the outbox sender.

One thread sends the due deliveries by C-STORE (:mod:`dicom_node.net.scu`), one association per
destination and pass (every due object of that destination, SR before SC), or by STOW-RS to a
DICOMweb destination (:mod:`dicom_node.dicomweb.stowrs`), one request per destination and
pass; the same rows, retries and back-off either way. Between passes it sleeps until the
worklist announces a due delivery (a study completed with outputs, in any process:
:mod:`dicom_node.stages.wakeup`), so delivery overlaps the next study's processing, or until
the next retry is due (``next_attempt_at``, backoff). A failed send is retried with backoff; a
refusal that cannot change (:data:`PERMANENT_REFUSALS`) fails the delivery at once.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from dicom_node.destinations import DicomwebDestination, SendResult
from dicom_node.dicomweb.stowrs import send_files as stow_files
from dicom_node.net.scu import send_files
from dicom_node.stages.wakeup import ERROR_WAIT, WokenThread
from triage_core.errors import DeliveryError, WorklistError

if TYPE_CHECKING:
    from dicom_node.metrics import Metrics
    from dicom_node.settings import NodeSettings
    from dicom_node.stages.wakeup import Wakeups
    from triage_core.worklist import DeliveryRow, Worklist

logger = logging.getLogger(__name__)

#: Most deliveries claimed (and sent, one association per destination) in one pass.
BATCH = 200

#: C-STORE statuses after which sending the same object again is pointless.
PERMANENT_REFUSALS = (0xA900, 0xC000)


def is_permanent(status: int | None) -> bool:
    """Whether a C-STORE failure status means "do not send this object again"."""
    return status is not None and any(
        (status & 0xFF00) == code or (status & 0xF000) == code for code in PERMANENT_REFUSALS
    )


class Delivery(WokenThread):
    """The delivery thread of a process (``triage serve`` and ``triage worker`` both run one)."""

    thread_name = "triage-delivery"

    def __init__(
        self,
        settings: NodeSettings,
        worklist: Worklist,
        wakeups: Wakeups,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(wakeups)
        self.settings = settings
        self.worklist = worklist
        self.metrics = metrics
        self._claim_failed = False

    def _run(self) -> None:
        waiter = self.wakeups.delivery_waiter()  # made before the first look: nothing is missed
        while not self._stop.is_set():
            self._claim_failed = False
            try:
                while self.deliver_due() >= BATCH and not self._stop.is_set():
                    pass  # a full batch: more may be due
            except Exception:  # noqa: BLE001 - deliver_due records its errors; keep serving
                logger.exception("delivery pass failed")
                self._claim_failed = True
            if self._claim_failed:  # due rows we cannot take: do not spin on them
                self._stop.wait(ERROR_WAIT)
                continue
            waiter.wait(self.wakeups.bounded(self._next_due_in()))

    def _next_due_in(self) -> float | None:
        """Seconds until the next retry is due (``None``: nothing pending)."""
        try:
            return self.worklist.deliveries.next_due_in()
        except WorklistError as exc:
            logger.error("delivery schedule unavailable: %s", exc)
            return None

    def deliver_due(self) -> int:
        """Send the due deliveries, one association per destination; returns objects sent."""
        try:
            rows = self.worklist.deliveries.claim_due(
                lease_seconds=max(60.0, self.settings.network_timeout * 2), limit=BATCH
            )
        except WorklistError as exc:
            logger.error("delivery pass failed: %s", exc)
            self._claim_failed = True
            return 0
        by_destination: dict[str, list[DeliveryRow]] = defaultdict(list)
        for row in rows:
            by_destination[row.destination].append(row)
        return sum(self._send(dest, group) for dest, group in by_destination.items())

    def _send(self, destination_text: str, group: list[DeliveryRow]) -> int:
        """One association (or one STOW-RS request) to one destination; returns the objects
        sent and recorded."""
        started = time.perf_counter()
        paths = [row.path for row in group]
        try:
            destination = self.settings.destination(destination_text)
            if isinstance(destination, DicomwebDestination):
                results = stow_files(destination, paths, timeout=self.settings.network_timeout)
            else:
                results = send_files(
                    destination,
                    paths,
                    calling_ae=self.settings.ae_title,
                    timeout=self.settings.network_timeout,
                    max_pdu_size=self.settings.max_pdu_size,
                )
        except (DeliveryError, ValueError) as exc:
            for row in group:
                self._mark_failed(row, str(exc), permanent=False)
            return 0
        sent = sum(self._record(row, res) for row, res in zip(group, results, strict=True))
        for study_uid in sorted({row.study_uid for row in group}):
            mine = [(r, x) for r, x in zip(group, results, strict=True) if r.study_uid == study_uid]
            logger.info(
                "study %s stage=delivered to %s (%d/%d object(s) ok) in %.0f ms",
                study_uid,
                destination_text,
                sum(1 for _, x in mine if x.ok),
                len(mine),
                (time.perf_counter() - started) * 1e3,
            )
        return sent

    def _record(self, row: DeliveryRow, res: SendResult) -> bool:
        if not res.ok:
            self._mark_failed(row, res.message, permanent=is_permanent(res.status))
            return False
        try:
            self.worklist.deliveries.mark_sent(row.id)
        except WorklistError as exc:
            logger.error("delivery %d sent but not recorded: %s", row.id, exc)
            return False
        if self.metrics is not None:
            self.metrics.deliveries_sent.inc()
        return True

    def _mark_failed(self, row: DeliveryRow, error: str, permanent: bool) -> None:
        if self.metrics is not None:
            self.metrics.deliveries_failed.inc()
        try:
            self.worklist.deliveries.mark_failed(row.id, error, permanent=permanent)
        except WorklistError as exc:
            logger.error("delivery %d: failure not recorded: %s", row.id, exc)
