"""The DICOM application entity of ``triage serve``: C-ECHO and C-STORE SCP.

Every storage SOP class is accepted (what is not a chest radiograph is stored and later marked
not eligible), each with the transfer syntaxes listed in :data:`TRANSFER_SYNTAXES`: pynetdicom
only accepts the syntaxes that are listed, so the compressed ones are named explicitly.
Associations are admitted by :class:`~dicom_node.handlers.AccessPolicy` (EVT_REQUESTED) and
every accepted socket gets ``TCP_NODELAY`` (EVT_CONN_OPEN).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dicom_node.handlers import (
    AccessPolicy,
    StoreContext,
    handle_conn_open,
    handle_echo,
    handle_requested,
    handle_store,
)

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.transport import ThreadedAssociationServer

    from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every storage SOP class (preference order).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


def build_ae(settings: NodeSettings) -> AE:
    """An AE with Verification and every storage SOP class, configured from ``settings``."""
    from pynetdicom import AE, AllStoragePresentationContexts

    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.network_timeout = settings.network_timeout
    ae.acse_timeout = settings.network_timeout
    ae.dimse_timeout = settings.network_timeout
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax:
            ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
    return ae


def start_scp(
    settings: NodeSettings, store: StoreContext, policy: AccessPolicy | None = None
) -> ThreadedAssociationServer:
    """Start listening on ``settings.bind_address:settings.port`` (non-blocking).

    Returns the server; call ``server.shutdown()`` to stop it.
    """
    from pynetdicom import evt

    policy = policy or AccessPolicy(tuple(settings.allow_ae))
    if not policy.allowed:
        logger.warning(
            "no --allow-ae given: associations from ANY calling AE are accepted on port %d",
            settings.port,
        )
    else:
        logger.info("calling AEs allowed: %s", ", ".join(str(p) for p in policy.allowed))
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, handle_conn_open, [settings.tcp_nodelay]),
        (evt.EVT_REQUESTED, handle_requested, [policy]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store]),
    ]
    server = ae.start_server(
        (settings.bind_address, settings.port), block=False, evt_handlers=handlers
    )
    assert server is not None  # block=False always returns the server
    logger.info(
        "DICOM node %s listening on %s:%d (max %d associations, max PDU %d)",
        settings.ae_title,
        settings.bind_address,
        server.server_address[1],
        settings.max_associations,
        settings.max_pdu_size,
    )
    return server
