"""Association negotiation (PS3.8 7.1, PS3.7 D.3.3): what we accept and the A-ASSOCIATE-AC.

Decoding the request, presentation context and SCP/SCU role negotiation
(``negotiate_as_acceptor``) and encoding the A-ASSOCIATE-AC are pynetdicom's (well tested,
conformant); the request reaches them only after :func:`~dicom_node.net.pdu.check_associate_rq`
has bounded its shape. The answers are cached: a peer proposes the same list each time.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from dicom_node.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.net import limits
from dicom_node.net.pdu import (
    APPLICATION_CONTEXT_NOT_SUPPORTED,
    PROTOCOL_VERSION_NOT_SUPPORTED,
    ProtocolError,
    Rejection,
    check_associate_rq,
)

#: The DICOM application context (PS3.7 A.2.1).
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
#: Transfer syntaxes accepted for Verification.
VERIFICATION_SYNTAXES: tuple[str, ...] = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
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

#: Offsets of the Called and Calling AE title fields, in the RQ and in the AC PDU alike.
CALLED_AE = slice(10, 26)
CALLING_AE = slice(26, 42)


def storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class we accept (pynetdicom's list of storage SOP classes)."""
    from pynetdicom import AllStoragePresentationContexts

    return tuple(
        str(c.abstract_syntax) for c in AllStoragePresentationContexts if c.abstract_syntax
    )


def supported_contexts() -> list[Any]:
    """Verification and every storage SOP class with our transfer syntaxes (pynetdicom form)."""
    from pynetdicom.presentation import build_context

    contexts = [build_context(VERIFICATION, list(VERIFICATION_SYNTAXES))]
    contexts += [build_context(uid, list(TRANSFER_SYNTAXES)) for uid in storage_sop_classes()]
    return contexts


@dataclass(frozen=True)
class Negotiated:
    """What an accepted association agreed on."""

    calling_ae: str
    called_ae: str
    contexts: dict[int, tuple[str, str]]  # context ID -> (abstract syntax, transfer syntax)
    proposed: int  # presentation contexts proposed
    peer_max_pdu: int  # 0 = unlimited
    ac_pdu: bytes


#: Bytes that are not allowed in an AE title (PS3.5 AE: printable ASCII, no backslash) become
#: "?", so that a hostile title can neither match an allowed one nor forge a log line.
_AE_BYTES = bytes(c if 0x20 <= c <= 0x7E and c != 0x5C else 0x3F for c in range(256))


def ae_titles(rq: bytes) -> tuple[str, str]:
    """``(calling, called)`` AE titles of an A-ASSOCIATE-RQ PDU (read before any decoding)."""
    return (
        rq[CALLING_AE].translate(_AE_BYTES).decode("ascii").strip(" "),
        rq[CALLED_AE].translate(_AE_BYTES).decode("ascii").strip(" "),
    )


def negotiate(rq: bytes, our_contexts: list[Any], max_pdu: int) -> Negotiated | Rejection:
    """Decode an A-ASSOCIATE-RQ PDU (header included) and negotiate it.

    Raises :class:`~dicom_node.net.pdu.ProtocolError` when the PDU cannot be decoded.
    """
    from pynetdicom.pdu import A_ASSOCIATE_AC as AcPDU
    from pynetdicom.pdu import A_ASSOCIATE_RQ as RqPDU
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
        MaximumLengthNotification,
        SCP_SCU_RoleSelectionNegotiation,
    )
    from pynetdicom.presentation import negotiate_as_acceptor

    from dicom_node.net.pdu import ABORT_BY_USER

    try:
        pdu = RqPDU()
        pdu.decode(rq)
        request = pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's protocol error
        raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {exc}", ABORT_BY_USER) from exc
    if not (pdu.protocol_version & 0x0001):
        return PROTOCOL_VERSION_NOT_SUPPORTED
    if str(request.application_context_name or "") != APPLICATION_CONTEXT:
        return APPLICATION_CONTEXT_NOT_SUPPORTED
    peer_max = 0
    roles: dict[Any, tuple[bool | None, bool | None]] = {}
    for item in request.user_information or []:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
    proposed = list(request.presentation_context_definition_list or [])
    try:
        result, role_items = negotiate_as_acceptor(proposed, our_contexts, roles or None)
    except Exception as exc:  # noqa: BLE001 - e.g. duplicate context IDs
        raise ProtocolError(f"A-ASSOCIATE-RQ cannot be negotiated: {exc}", ABORT_BY_USER) from exc
    accepted = {
        int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in result
        if cx.result == 0x00 and cx.context_id is not None and cx.transfer_syntax
    }
    accept = A_ASSOCIATE()
    accept.application_context_name = APPLICATION_CONTEXT
    accept.calling_ae_title = request.calling_ae_title
    accept.called_ae_title = request.called_ae_title
    accept.result = 0x00
    accept.result_source = 0x01
    accept.presentation_context_definition_results_list = result
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    accept.user_information = [length, implementation, version, *role_items]
    ac = AcPDU()
    ac.from_primitive(accept)
    calling, called = ae_titles(rq)
    return Negotiated(calling, called, accepted, len(proposed), peer_max, bytes(ac.encode()))


class Negotiator:
    """:func:`negotiate` with a cache of its answers.

    Decoding and negotiating an A-ASSOCIATE-RQ with pynetdicom costs about 12 ms for the ~120
    contexts DCMTK's ``storescu`` proposes (most of it validating UIDs), paid by every
    association. A peer proposes the same list each time, so the answer is cached, keyed by a
    digest of the request with its two AE title fields left out; the AC echoes the request's
    AE title fields (PS3.8 9.3.3), which are patched into the cached AC.
    """

    def __init__(self, contexts: list[Any], max_pdu: int) -> None:
        self.contexts = contexts
        self.max_pdu = max_pdu
        self._cache: dict[bytes, Negotiated | Rejection] = {}
        self._lock = threading.Lock()

    def __call__(self, rq: bytes) -> Negotiated | Rejection:
        """The answer to an A-ASSOCIATE-RQ PDU (header included, length already bounded).

        Raises :class:`~dicom_node.net.pdu.ProtocolError` (malformed) or
        :class:`~dicom_node.net.pdu.LimitExceeded` (over our bounds).
        """
        key = hashlib.blake2b(rq[:10] + rq[42:], digest_size=20).digest()
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            check_associate_rq(rq[limits.PDU_HEADER :])
            hit = negotiate(rq, self.contexts, self.max_pdu)
            with self._lock:
                if len(self._cache) >= limits.NEGOTIATION_CACHE:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = hit
        if isinstance(hit, Rejection):
            return hit
        calling, called = ae_titles(rq)
        ac = hit.ac_pdu
        return Negotiated(
            calling,
            called,
            hit.contexts,
            hit.proposed,
            hit.peer_max_pdu,
            ac[: CALLED_AE.start] + rq[CALLED_AE.start : CALLING_AE.stop] + ac[CALLING_AE.stop :],
        )
