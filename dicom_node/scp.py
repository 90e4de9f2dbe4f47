"""The DICOM application entity of ``triage serve``: C-ECHO and C-STORE SCP.

Joins the network layer (:mod:`dicom_node.net`) to the receive path: every storage SOP
class is accepted (what is not a chest radiograph is stored and later marked not eligible),
each with the transfer syntaxes of :data:`dicom_node.net.negotiation.TRANSFER_SYNTAXES`;
associations are admitted by :class:`~dicom_node.net.policy.AccessPolicy`; each C-STORE data
set goes to an :class:`~dicom_node.ingest.incoming.IncomingInstance`.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from dicom_node.ingest.incoming import IncomingInstance
from dicom_node.ingest.spool import StoreContext
from dicom_node.net.policy import AccessPolicy
from dicom_node.net.server import StorageServer
from dicom_node.net.tls import server_context

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings

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
