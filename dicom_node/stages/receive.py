"""The receive stage of ``triage serve``: recovery, then the C-ECHO and C-STORE SCP.

:func:`start_scp` joins the network layer (:mod:`dicom_node.net`) to the ingest layer
(:mod:`dicom_node.ingest`): every storage SOP class is accepted (what is not a chest radiograph
is stored and later marked not eligible), each with the transfer syntaxes of
:data:`dicom_node.net.negotiation.TRANSFER_SYNTAXES`; associations are admitted by
:class:`~dicom_node.net.policy.AccessPolicy`; each C-STORE data set goes to an
:class:`~dicom_node.ingest.incoming.IncomingInstance`.

:class:`Receiver` runs the one recovery routine (:func:`~dicom_node.ingest.recovery.
recover_storage`) before the DICOM port opens, then assembles the receive path: the
installation's identifier salt, the :class:`~dicom_node.ingest.spool.GroupCommitter`, the
:class:`~dicom_node.ingest.spool.StoreContext` and the SCP. It sits above both the network layer
and the ingest layer, which do not know each other's assembly.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from dicom_node.ingest.incoming import IncomingInstance
from dicom_node.ingest.recovery import Recovered, recover_storage
from dicom_node.ingest.spool import (
    GroupCommitter,
    StoreContext,
    installation_salt,
    make_record_many,
    make_recorder,
)
from dicom_node.net.policy import AccessPolicy
from dicom_node.net.server import StorageServer
from dicom_node.net.tls import server_context

if TYPE_CHECKING:
    from dicom_node.metrics import Metrics
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)


def start_scp(
    settings: NodeSettings, store: StoreContext, policy: AccessPolicy | None = None
) -> StorageServer:
    """Start listening on ``settings.bind_address:settings.port`` (non-blocking).

    Returns the server; call ``server.shutdown()`` to stop it.

    Raises
    ------
    ConfigError
        The TLS certificate, key or CA cannot be loaded.
    """
    policy = policy or AccessPolicy.from_settings(settings)
    if not policy.allowed:
        logger.warning(
            "no --allow-ae given: associations from ANY calling AE are accepted on port %d",
            settings.port,
        )
    else:
        logger.info("calling AEs allowed: %s", ", ".join(str(p) for p in policy.allowed))
    if policy.called_ae is None:
        logger.warning("accept_any_called_ae: associations to ANY called AE title are accepted")
    tls = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = server_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
    open_instance = functools.partial(IncomingInstance.open, store)
    server = StorageServer(settings, open_instance, policy, tls).start()
    logger.info(
        "DICOM node %s listening on %s:%d%s (max %d associations, max PDU %d)",
        settings.ae_title,
        settings.bind_address,
        server.server_address[1],
        " over TLS" + (" with client certificates" if settings.tls_ca else "") if tls else "",
        settings.max_associations,
        settings.max_pdu_size,
    )
    return server


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
