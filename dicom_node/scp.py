"""The DICOM application entity of ``triage serve``: C-ECHO and C-STORE SCP.

Every storage SOP class is accepted (what is not a chest radiograph is stored and later marked
not eligible), each with the transfer syntaxes listed in :data:`TRANSFER_SYNTAXES`, the
compressed ones included. Associations are admitted by
:class:`~dicom_node.net.policy.AccessPolicy`; the protocol engine is :mod:`dicom_node.ulp`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dicom_node.handlers import StoreContext
from dicom_node.net.policy import AccessPolicy

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings
    from dicom_node.ulp import StorageServer

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


def start_scp(
    settings: NodeSettings, store: StoreContext, policy: AccessPolicy | None = None
) -> StorageServer:
    """Start listening on ``settings.bind_address:settings.port`` (non-blocking).

    Returns the server; call ``server.shutdown()`` to stop it.
    """
    from dicom_node.ulp import StorageServer

    policy = policy or AccessPolicy(tuple(settings.allow_ae))
    if not policy.allowed:
        logger.warning(
            "no --allow-ae given: associations from ANY calling AE are accepted on port %d",
            settings.port,
        )
    else:
        logger.info("calling AEs allowed: %s", ", ".join(str(p) for p in policy.allowed))
    server = StorageServer(settings, store, policy).start()
    logger.info(
        "DICOM node %s listening on %s:%d (max %d associations, max PDU %d)",
        settings.ae_title,
        settings.bind_address,
        server.server_address[1],
        settings.max_associations,
        settings.max_pdu_size,
    )
    return server
