"""The ingest component of ``triage serve``: recovery, then the C-STORE SCP.

:class:`Receiver` runs the one recovery routine (:func:`~dicom_node.ingest.recovery.
recover_storage`) before the DICOM port opens, then assembles the receive path: the
installation's identifier salt, the :class:`~dicom_node.ingest.spool.GroupCommitter`, the
:class:`~dicom_node.ingest.spool.StoreContext` and the SCP (:func:`dicom_node.scp.start_scp`).
It sits above both the network layer and the ingest layer, which do not know each other's
assembly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dicom_node.ingest.recovery import Recovered, recover_storage
from dicom_node.ingest.spool import (
    GroupCommitter,
    StoreContext,
    installation_salt,
    make_record_many,
    make_recorder,
)
from dicom_node.scp import start_scp

if TYPE_CHECKING:
    from dicom_node.metrics import Metrics
    from dicom_node.net.server import StorageServer
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)


class Receiver:
    """Receive C-STOREs into the spool and the worklist (start: recovery first, port last)."""

    def __init__(
        self, settings: NodeSettings, worklist: Worklist, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.worklist = worklist
        self.metrics = metrics
        self.recovered: Recovered | None = None
        self.store: StoreContext | None = None
        self.committer: GroupCommitter | None = None
        self.scp: StorageServer | None = None

    def start(self) -> None:
        """Recover what a stop or crash left (before the port opens), then open the port."""
        settings, worklist = self.settings, self.worklist
        salt = installation_salt(settings.storage)
        self.recovered = recover_storage(settings.storage, worklist, salt=salt)
        self.committer = GroupCommitter(
            make_record_many(worklist, salt), fsync=settings.spool_fsync
        )
        self.store = StoreContext(
            storage=settings.storage,
            record=make_recorder(worklist, salt),
            log_phi=settings.log_phi,
            salt=salt,
            metrics=self.metrics,
            fsync=settings.spool_fsync,
            committer=self.committer,
        )
        if not settings.spool_fsync:
            logger.warning(
                "spool_fsync is OFF: a success status no longer means the instance "
                "survives a power cut (benchmarks only)"
            )
        self.scp = server = start_scp(settings, self.store)
        if self.metrics is not None:
            self.metrics.attach_receiver(lambda: float(len(server.active_associations)))

    @property
    def port(self) -> int:
        return int(self.scp.server_address[1]) if self.scp is not None else 0

    def stop(self, deadline: float | None = None) -> None:
        """Close the port (open associations end; their unfinished instances are never
        acknowledged), then the committer after its queued instances."""
        if self.scp is not None:
            self.scp.shutdown()
            self.scp = None
        if self.committer is not None:
            self.committer.close()
            self.committer = None
