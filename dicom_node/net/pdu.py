"""Upper-layer PDUs (PS3.8 9.3): types, the codes of A-ASSOCIATE-RJ and A-ABORT, the PDUs we
send, and a bounded structural check of the A-ASSOCIATE-RQ before anything decodes it."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from dicom_node.net import limits


class PduType(IntEnum):
    """PDU types (PS3.8 9.3.1; the first byte of every PDU)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


@dataclass(frozen=True)
class Rejection:
    """A-ASSOCIATE-RJ Result, Source and Reason/Diag. (PS3.8 Table 9-21)."""

    result: int  # 1 rejected-permanent, 2 rejected-transient
    source: int  # 1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation)
    reason: int
    text: str

    def __str__(self) -> str:
        kind = "permanent" if self.result == 1 else "transient"
        codes = f"result {self.result}, source {self.source}, reason {self.reason}"
        return f"{self.text} ({kind}; {codes})"


#: Every rejection this node sends (PS3.8 Table 9-21).
APPLICATION_CONTEXT_NOT_SUPPORTED = Rejection(1, 1, 2, "application-context-name-not-supported")
CALLING_AE_NOT_RECOGNIZED = Rejection(1, 1, 3, "calling-AE-title-not-recognized")
CALLED_AE_NOT_RECOGNIZED = Rejection(1, 1, 7, "called-AE-title-not-recognized")
PROTOCOL_VERSION_NOT_SUPPORTED = Rejection(1, 2, 2, "protocol-version-not-supported")
REQUEST_TOO_LARGE = Rejection(1, 3, 2, "local-limit-exceeded")
TOO_MANY_ASSOCIATIONS = Rejection(2, 3, 2, "local-limit-exceeded")
REJECTIONS: dict[str, Rejection] = {
    "application context other than DICOM's": APPLICATION_CONTEXT_NOT_SUPPORTED,
    "calling AE title not in the allow-list": CALLING_AE_NOT_RECOGNIZED,
    "called AE title not ours": CALLED_AE_NOT_RECOGNIZED,
    "protocol version without bit 0": PROTOCOL_VERSION_NOT_SUPPORTED,
    "request over our bounds": REQUEST_TOO_LARGE,
    "max_associations already open": TOO_MANY_ASSOCIATIONS,
}


@dataclass(frozen=True)
class Abort:
    """A-ABORT Source and Reason/Diag. (PS3.8 Table 9-26)."""

    source: int  # 0 service-user, 2 service-provider
    reason: int  # significant only when source is 2
    text: str

    def __str__(self) -> str:
        return f"{self.text} (source {self.source}, reason {self.reason})"


#: AA-1: invalid PDU before association, or a DIMSE error (our application aborts).
ABORT_BY_USER = Abort(0, 0, "service-user")
#: AA-8 with reason 0: the association went silent for ``network_timeout``.
ABORT_NOT_SPECIFIED = Abort(2, 0, "reason-not-specified")
#: AA-8: a PDU type that does not exist.
ABORT_UNRECOGNIZED_PDU = Abort(2, 1, "unrecognized-PDU")
#: AA-8: a PDU that exists but is not allowed in this state (e.g. a second A-ASSOCIATE-RQ).
ABORT_UNEXPECTED_PDU = Abort(2, 2, "unexpected-PDU")
#: AA-8: a length or identifier we cannot accept (PDU too long, PDV overrunning its PDU,
#: control PDU body not 4 bytes, PDV for a context that was not accepted).
ABORT_INVALID_PARAMETER = Abort(2, 6, "invalid-PDU-parameter-value")
ABORTS = (
    ABORT_BY_USER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNRECOGNIZED_PDU,
    ABORT_UNEXPECTED_PDU,
    ABORT_INVALID_PARAMETER,
)


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted with :attr:`abort`."""

    def __init__(self, message: str, abort: Abort = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.abort = abort


class LimitExceeded(ProtocolError):
    """A well-formed A-ASSOCIATE-RQ over our bounds: rejected with :data:`REQUEST_TOO_LARGE`."""


class PeerGone(Exception):
    """The peer closed the connection (or aborted)."""


# ---------------------------------------------------------------------- PDUs we send
def encode_pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def abort_pdu(abort: Abort) -> bytes:
    return encode_pdu(PduType.A_ABORT, struct.pack(">BBBB", 0, 0, abort.source, abort.reason))


def reject_pdu(rejection: Rejection) -> bytes:
    body = struct.pack(">BBBB", 0, rejection.result, rejection.source, rejection.reason)
    return encode_pdu(PduType.A_ASSOCIATE_RJ, body)


RELEASE_RP = encode_pdu(PduType.A_RELEASE_RP, b"\x00\x00\x00\x00")


def p_data(context_id: int, message: bytes, peer_max_pdu: int, is_command: bool = True) -> bytes:
    """``message`` as P-DATA-TF PDUs of one PDV each, none longer than ``peer_max_pdu``
    (0: no limit)."""
    limit = max(peer_max_pdu - limits.PDV_HEADER, 1) if peer_max_pdu else len(message)
    out = bytearray()
    pieces = range(0, max(len(message), 1), max(limit, 1))
    for index, start in enumerate(pieces):
        chunk = message[start : start + limit]
        control = (0x01 if is_command else 0) | (0x02 if index == len(pieces) - 1 else 0)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk
        out += encode_pdu(PduType.P_DATA_TF, pdv)
    return bytes(out)


# ---------------------------------------------------------------------- A-ASSOCIATE-RQ
def check_associate_rq(body: bytes) -> None:
    """Walk the items of an A-ASSOCIATE-RQ body (PS3.8 9.3.2) without decoding any value.

    Every item length must fit its parent; there are at most
    :data:`~dicom_node.net.limits.MAX_PRESENTATION_CONTEXTS` presentation contexts, each with
    one abstract syntax and 1 to :data:`~dicom_node.net.limits.MAX_TRANSFER_SYNTAXES`
    transfer syntaxes, one application context, and at most
    :data:`~dicom_node.net.limits.MAX_USER_INFORMATION_ITEMS` user information sub-items.
    Raises :class:`ProtocolError` (malformed) or :class:`LimitExceeded` (over a bound)
    otherwise, so that pynetdicom's decoder (which validates every UID, ~4 us a byte) only
    sees requests of a bounded shape.
    """
    if len(body) < limits.ASSOCIATE_RQ_FIXED:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes", ABORT_BY_USER)
    contexts = application = 0
    for item_type, start, end in _items(body, limits.ASSOCIATE_RQ_FIXED, len(body)):
        if item_type == 0x10:
            application += 1
        elif item_type == 0x20:
            contexts += 1
            if end - start < 4:
                raise ProtocolError("presentation context item shorter than 4 bytes", ABORT_BY_USER)
            abstract = syntaxes = 0
            for kind, _s, _e in _items(body, start + 4, end):
                abstract += kind == 0x30
                syntaxes += kind == 0x40
            if abstract != 1 or not syntaxes:
                raise ProtocolError(
                    f"presentation context with {abstract} abstract syntaxes and "
                    f"{syntaxes} transfer syntaxes",
                    ABORT_BY_USER,
                )
            if syntaxes > limits.MAX_TRANSFER_SYNTAXES:
                raise LimitExceeded(f"a presentation context proposes {syntaxes} transfer syntaxes")
        elif item_type == 0x50:
            sub_items = sum(1 for _item in _items(body, start, end))
            if sub_items > limits.MAX_USER_INFORMATION_ITEMS:
                raise LimitExceeded(f"{sub_items} user information sub-items")
    if contexts > limits.MAX_PRESENTATION_CONTEXTS:
        raise LimitExceeded(f"{contexts} presentation contexts proposed")
    if application != 1 or not contexts:
        raise ProtocolError(
            f"A-ASSOCIATE-RQ with {application} application contexts and {contexts} "
            "presentation contexts",
            ABORT_BY_USER,
        )


def _items(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(type, value start, value end)`` of the items in ``data[start:end]`` (each item:
    type (1), reserved (1), length (2), value), one at a time (nothing is collected)."""
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise ProtocolError(f"item header cut at byte {pos}", ABORT_BY_USER)
        item_type, _reserved, length = struct.unpack_from(">BBH", data, pos)
        if pos + 4 + length > end:
            raise ProtocolError(
                f"item 0x{item_type:02X} of {length} bytes overruns its parent", ABORT_BY_USER
            )
        yield item_type, pos + 4, pos + 4 + length
        pos += 4 + length
