"""The receive side of the DICOM upper layer (PS3.8) and DIMSE (PS3.7) for ``triage serve``.

A storage SCP that answers C-ECHO and C-STORE on blocking sockets, one thread per association.
It replaces pynetdicom's acceptor on the receive path only, for speed: pynetdicom hands every
PDU from a polling reactor thread to the association thread through queues, which costs 2.5 to
4 ms per C-STORE (pynetdicom issue 701), several times what DCMTK's ``storescp`` spends in all.
Here a C-STORE costs a few socket reads, and its data set goes to disk as it arrives.

What is reused from pynetdicom (well tested, standard-conformant): decoding the
A-ASSOCIATE-RQ, presentation context and SCP/SCU role negotiation
(``negotiate_as_acceptor``) and encoding the A-ASSOCIATE-AC. What is ours: the PDU loop,
P-DATA reassembly, the command set codec (group 0000, implicit VR little endian) and the
responses. The sending side (:mod:`dicom_node.scu`) stays on pynetdicom.

Protocol behaviour
------------------
* A-ASSOCIATE-RQ: rejected permanently when the calling AE (or host) is not allowed
  (1, 1, 3), the application context is not DICOM's (1, 1, 2) or the protocol version lacks
  bit 0 (1, 3, 2); transiently when ``max_associations`` are open (2, 3, 2). Otherwise accepted
  with every proposed context we support (Verification, every storage class, the transfer
  syntaxes of :data:`dicom_node.scp.TRANSFER_SYNTAXES`) and our maximum PDU length.
* P-DATA-TF: command and data set fragments are reassembled per presentation context; a data
  set fragment is written to the instance's temporary file as soon as it is read (memory stays
  bounded by one read buffer whatever the PDU size).
* C-ECHO-RQ -> success; C-STORE-RQ -> :class:`~dicom_node.handlers.IncomingInstance` (durable
  write, then the status); any other command -> status 0x0211 (unrecognised operation).
* A-RELEASE-RQ -> A-RELEASE-RP. A-ABORT, a closed socket, a protocol error (unexpected PDU,
  unknown context, bad lengths) or ``network_timeout`` without data -> A-ABORT sent where it
  makes sense, the socket closed, and an instance still being received is discarded (it was
  never acknowledged).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from triage_core import __version__

if TYPE_CHECKING:
    from dicom_node.handlers import IncomingInstance, StoreContext
    from dicom_node.net.policy import AccessPolicy
    from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)

#: Our Implementation Class UID (a UUID-derived UID, PS3.5 B.2) and version name (<= 16 chars).
IMPLEMENTATION_CLASS_UID = "2.25.2057702733104324283583332710527436324"
IMPLEMENTATION_VERSION_NAME = f"CXRTRIAGE_{__version__}"[:16]
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# DIMSE command fields and statuses
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
STATUS_UNRECOGNIZED_OPERATION = 0x0211
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

#: Largest command set, association request or other non-data PDU we read into memory.
MAX_CONTROL_BYTES = 1 << 20
#: Read buffer for data set fragments (written to disk as they arrive).
CHUNK = 1 << 20


class ProtocolError(Exception):
    """The peer broke the upper layer protocol; the association is aborted."""


class PeerGone(Exception):
    """The peer closed the connection (or aborted)."""


# ---------------------------------------------------------------------- command set codec
def decode_command(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Command set (implicit VR little endian, group 0000) -> ``{element: value bytes}``."""
    out: dict[int, bytes] = {}
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError(f"command set ends inside an element header at byte {pos}")
        group, element, length = struct.unpack_from("<HHI", view, pos)
        pos += 8
        if group != 0x0000:
            raise ProtocolError(f"command set holds ({group:04X},{element:04X})")
        if pos + length > end:
            raise ProtocolError(f"command element (0000,{element:04X}) overruns the command set")
        out[element] = bytes(view[pos : pos + length])
        pos += length
    return out


def command_us(command: dict[int, bytes], element: int) -> int | None:
    value = command.get(element)
    if value is None or len(value) != 2:
        return None
    return int(struct.unpack("<H", value)[0])


def command_uid(command: dict[int, bytes], element: int) -> str:
    return command.get(element, b"").decode("latin-1").rstrip("\x00 ")


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("latin-1", "replace")[:64]
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str = "",
    sop_instance_uid: str = "",
) -> bytes:
    """A response command set (no data set), with its group length."""
    body = b""
    if sop_class_uid:
        body += _element(0x0002, _uid_value(sop_class_uid))
    body += _element(0x0100, struct.pack("<H", command_field))
    body += _element(0x0120, struct.pack("<H", message_id))
    body += _element(0x0800, struct.pack("<H", NO_DATASET))
    body += _element(0x0900, struct.pack("<H", status))
    if sop_instance_uid:
        body += _element(0x1000, _uid_value(sop_instance_uid))
    return _element(0x0000, struct.pack("<I", len(body))) + body


# ---------------------------------------------------------------------- PDUs we send
def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    """A-ABORT: ``source`` 0 = service user, 2 = service provider (with a reason)."""
    return _pdu(A_ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, struct.pack(">BBBB", 0, result, source, reason))


RELEASE_RP = _pdu(A_RELEASE_RP, b"\x00\x00\x00\x00")


@dataclass
class Negotiated:
    """What an accepted association agreed on."""

    calling_ae: str
    called_ae: str
    contexts: dict[int, tuple[str, str]]  # context ID -> (abstract syntax, transfer syntax)
    peer_max_pdu: int  # 0 = unlimited
    ac_pdu: bytes


def supported_contexts() -> list[Any]:
    """Verification and every storage SOP class with our transfer syntaxes (pynetdicom form)."""
    from pynetdicom import AllStoragePresentationContexts
    from pynetdicom.presentation import build_context

    from dicom_node.scp import TRANSFER_SYNTAXES

    contexts = [build_context(VERIFICATION, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])]
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax:
            contexts.append(build_context(context.abstract_syntax, list(TRANSFER_SYNTAXES)))
    return contexts


def negotiate(
    rq_bytes: bytes, our_contexts: list[Any], max_pdu: int
) -> tuple[Negotiated | None, tuple[int, int, int] | None, Any]:
    """Decode an A-ASSOCIATE-RQ PDU and negotiate it.

    Returns ``(negotiated, None, primitive)`` to accept, or ``(None, (result, source, reason),
    primitive)`` to reject. Raises :class:`ProtocolError` when the PDU cannot be decoded.
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

    try:
        pdu = RqPDU()
        pdu.decode(rq_bytes)
        request = pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's protocol error
        raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {exc}") from exc
    calling = str(request.calling_ae_title or "").strip()
    called = str(request.called_ae_title or "").strip()
    if not (pdu.protocol_version & 0x0001):
        return None, (0x01, 0x03, 0x02), request
    if str(request.application_context_name or "") != APPLICATION_CONTEXT:
        return None, (0x01, 0x01, 0x02), request
    peer_max = 0
    roles: dict[Any, tuple[bool | None, bool | None]] = {}
    for item in request.user_information or []:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
    proposed = list(request.presentation_context_definition_list or [])
    result, role_items = negotiate_as_acceptor(proposed, our_contexts, roles or None)
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
    return Negotiated(calling, called, accepted, peer_max, ac.encode()), None, request


class Negotiator:
    """:func:`negotiate` with a cache of its answers.

    Decoding and negotiating an A-ASSOCIATE-RQ with pynetdicom costs about 12 ms for the ~120
    contexts DCMTK's ``storescu`` proposes (most of it validating UIDs), paid by every
    association. A peer proposes the same list each time, so the answer is cached, keyed by the
    request with its two AE title fields blanked; the AC echoes the request's AE title fields
    (PS3.8 9.3.3), which are patched into the cached AC.
    """

    #: Offsets of the Called and Calling AE title fields in both the RQ and the AC PDU.
    AE_FIELDS = slice(10, 42)

    def __init__(self, contexts: list[Any], max_pdu: int, size: int = 64) -> None:
        self.contexts = contexts
        self.max_pdu = max_pdu
        self.size = size
        self._cache: dict[bytes, tuple[Negotiated | None, tuple[int, int, int] | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, rq: bytes) -> tuple[Negotiated | None, tuple[int, int, int] | None, str]:
        """``(negotiated, rejection, calling AE title)`` for an A-ASSOCIATE-RQ PDU."""
        if len(rq) < 74:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {len(rq)} bytes")
        calling = rq[26:42].decode("ascii", "replace").strip(" \x00")
        called = rq[10:26].decode("ascii", "replace").strip(" \x00")
        key = rq[:10] + rq[42:]
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            negotiated, rejection, _request = negotiate(rq, self.contexts, self.max_pdu)
            hit = (negotiated, rejection)
            with self._lock:
                if len(self._cache) >= self.size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = hit
        negotiated, rejection = hit
        if negotiated is None:
            return None, rejection, calling
        ac = negotiated.ac_pdu
        return (
            Negotiated(
                calling,
                called,
                negotiated.contexts,
                negotiated.peer_max_pdu,
                ac[: self.AE_FIELDS.start] + rq[self.AE_FIELDS] + ac[self.AE_FIELDS.stop :],
            ),
            None,
            calling,
        )


# ---------------------------------------------------------------------- one association
class _Reader:
    """Exact reads from a blocking socket, small ones served from a buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        count = self.sock.recv_into(self.view[self.end :], len(self.buffer) - self.end)
        if not count:
            raise PeerGone("connection closed by the peer")
        self.end += count

    def exact(self, count: int) -> bytes:
        """``count`` bytes (for headers and control PDUs)."""
        if count > len(self.buffer):
            big = bytearray(count)
            self.into(memoryview(big))
            return bytes(big)
        if self.end - self.start < count:
            if len(self.buffer) - self.start < count:  # compact
                remaining = self.end - self.start
                self.buffer[:remaining] = self.buffer[self.start : self.end]
                self.start, self.end = 0, remaining
            while self.end - self.start < count:
                self._fill()
        out = bytes(self.view[self.start : self.start + count])
        self.start += count
        return out

    def into(self, target: memoryview) -> None:
        """Fill ``target`` completely (buffered bytes first, then straight from the socket)."""
        filled = 0
        buffered = min(self.end - self.start, len(target))
        if buffered:
            target[:buffered] = self.view[self.start : self.start + buffered]
            self.start += buffered
            filled = buffered
        while filled < len(target):
            count = self.sock.recv_into(target[filled:], len(target) - filled)
            if not count:
                raise PeerGone("connection closed by the peer")
            filled += count

    def stream(self, count: int, sink: Callable[[memoryview], None]) -> None:
        """Pass ``count`` bytes to ``sink`` in pieces of at most :data:`CHUNK` bytes."""
        remaining = count
        if self.end > self.start:
            take = min(self.end - self.start, remaining)
            sink(self.view[self.start : self.start + take])
            self.start += take
            remaining -= take
        if not remaining:
            return
        self.start = self.end = 0
        while remaining:
            take = min(remaining, len(self.buffer))
            piece = self.view[:take]
            self.into(piece)
            sink(piece)
            remaining -= take


class Association:
    """One accepted connection: negotiation, then PDUs until release or abort."""

    def __init__(
        self, sock: socket.socket, address: tuple[str, int], server: StorageServer
    ) -> None:
        self.sock = sock
        self.host = str(address[0])
        self.server = server
        self.reader = _Reader(sock)
        self.calling_ae = "?"
        self.contexts: dict[int, tuple[str, str]] = {}
        self.peer_max_pdu = 0
        self.incoming: IncomingInstance | None = None
        self.stores = 0

    # -------------------------------------------------------------- I/O
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu_header(self) -> tuple[int, int]:
        pdu_type, _reserved, length = struct.unpack(">BBI", self.reader.exact(6))
        return pdu_type, length

    # -------------------------------------------------------------- life cycle
    def run(self) -> None:
        try:
            if self._associate():
                self._serve()
        except PeerGone as exc:
            logger.debug("association from %s at %s: %s", self.calling_ae, self.host, exc)
        except TimeoutError:
            logger.warning(
                "association from %s at %s: no data for %.0f s, aborted",
                self.calling_ae,
                self.host,
                self.server.settings.network_timeout,
            )
            self._abort_quietly()
        except ProtocolError as exc:
            logger.warning("association from %s at %s aborted: %s", self.calling_ae, self.host, exc)
            self._abort_quietly()
        except OSError as exc:
            logger.warning("association from %s at %s: %s", self.calling_ae, self.host, exc)
        finally:
            if self.incoming is not None:
                self.incoming.discard("association ended inside a data set")
                self.incoming = None
            try:
                self.sock.close()
            except OSError:
                pass

    def _abort_quietly(self) -> None:
        try:
            self.send(abort_pdu(0x02, 0x00))
        except OSError:
            pass

    def _associate(self) -> bool:
        server = self.server
        pdu_type, length = self.read_pdu_header()
        if pdu_type != A_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        if length > MAX_CONTROL_BYTES:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes")
        body = self.reader.exact(length)
        negotiated, rejection, calling = server.negotiate(
            struct.pack(">BBI", pdu_type, 0, length) + body
        )
        self.calling_ae = calling or "?"
        if rejection is None and not server.policy.admits(self.calling_ae, self.host):
            logger.warning(
                "association from %r at %s rejected: calling AE not allowed",
                self.calling_ae,
                self.host,
            )
            rejection = (0x01, 0x01, 0x03)
        if rejection is None and not server.admit(self):
            logger.warning(
                "association from %r at %s rejected: %d associations already open",
                self.calling_ae,
                self.host,
                server.settings.max_associations,
            )
            rejection = (0x02, 0x03, 0x02)
        if rejection is not None or negotiated is None:
            result, source, reason = rejection or (0x01, 0x01, 0x01)
            if rejection not in ((0x01, 0x01, 0x03), (0x02, 0x03, 0x02)):  # those logged above
                logger.warning(
                    "association from %r at %s rejected (result %d, source %d, reason %d)",
                    self.calling_ae,
                    self.host,
                    result,
                    source,
                    reason,
                )
            self.send(reject_pdu(result, source, reason))
            return False
        self.contexts = negotiated.contexts
        self.peer_max_pdu = negotiated.peer_max_pdu
        self.send(negotiated.ac_pdu)
        logger.debug(
            "association from %s at %s accepted: %d of the proposed context(s)",
            self.calling_ae,
            self.host,
            len(self.contexts),
        )
        return True

    def _serve(self) -> None:
        try:
            self._pdu_loop()
        finally:
            self.server.leave(self)

    def _pdu_loop(self) -> None:
        command = bytearray()
        parsed: dict[int, bytes] | None = None
        context_id = 0
        while True:
            pdu_type, length = self.read_pdu_header()
            if pdu_type == P_DATA_TF:
                remaining = length
                while remaining:
                    if remaining < 6:
                        raise ProtocolError("P-DATA-TF ends inside a PDV header")
                    header = self.reader.exact(6)
                    pdv_length, pdv_context, control = struct.unpack(">IBB", header)
                    if pdv_length < 2 or pdv_length + 4 > remaining:
                        raise ProtocolError(f"PDV length {pdv_length} does not fit its PDU")
                    if pdv_context not in self.contexts:
                        raise ProtocolError(f"PDV for unknown presentation context {pdv_context}")
                    remaining -= 4 + pdv_length
                    fragment = pdv_length - 2
                    is_command, is_last = bool(control & 0x01), bool(control & 0x02)
                    if is_command:
                        if parsed is not None:
                            raise ProtocolError("a command arrived before the data set")
                        if len(command) + fragment > MAX_CONTROL_BYTES:
                            raise ProtocolError("command set too large")
                        command += self.reader.exact(fragment)
                        context_id = pdv_context
                        if is_last:
                            parsed = decode_command(command)
                            command = bytearray()
                            if command_us(parsed, 0x0800) == NO_DATASET:
                                self._dispatch(parsed, context_id)
                                parsed = None
                            else:
                                self._begin_dataset(parsed, context_id)
                    else:
                        if parsed is None:
                            raise ProtocolError("a data set fragment arrived without a command")
                        if pdv_context != context_id:
                            raise ProtocolError("data set on another context than its command")
                        self._dataset_fragment(fragment)
                        if is_last:
                            self._dispatch(parsed, context_id)
                            parsed = None
            elif pdu_type == A_RELEASE_RQ:
                self.reader.exact(length)
                if self.incoming is not None or parsed is not None:
                    logger.warning("association from %s released inside a message", self.calling_ae)
                self.send(RELEASE_RP)
                logger.debug(
                    "association from %s released after %d C-STORE(s)",
                    self.calling_ae,
                    self.stores,
                )
                return
            elif pdu_type == A_ABORT:
                self.reader.exact(min(length, MAX_CONTROL_BYTES))
                raise PeerGone("A-ABORT from the peer")
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")

    # -------------------------------------------------------------- DIMSE
    def _begin_dataset(self, command: dict[int, bytes], context_id: int) -> None:
        field = command_us(command, 0x0100)
        if field != C_STORE_RQ:
            return  # the data set of another command is read and dropped
        abstract, transfer_syntax = self.contexts[context_id]
        from dicom_node.handlers import IncomingInstance

        self.incoming = IncomingInstance.open(
            self.server.store,
            sop_class_uid=command_uid(command, 0x0002),
            sop_instance_uid=command_uid(command, 0x1000),
            transfer_syntax=transfer_syntax,
            calling_ae=self.calling_ae,
            context_class=abstract,
        )

    def _dataset_fragment(self, length: int) -> None:
        incoming = self.incoming
        if incoming is None:
            self.reader.stream(length, lambda _piece: None)
        else:
            self.reader.stream(length, incoming.write)

    def _dispatch(self, command: dict[int, bytes], context_id: int) -> None:
        field = command_us(command, 0x0100)
        message_id = command_us(command, 0x0110)
        if field is None or message_id is None:
            raise ProtocolError("command set without Command Field or Message ID")
        sop_class = command_uid(command, 0x0002)
        if field == C_ECHO_RQ:
            logger.debug("C-ECHO from %s", self.calling_ae)
            self._respond(context_id, encode_response(0x8030, message_id, 0x0000, sop_class))
        elif field == C_STORE_RQ:
            incoming, self.incoming = self.incoming, None
            sop_instance = command_uid(command, 0x1000)
            if incoming is None:  # C-STORE-RQ that said it has no data set
                status = 0xC210
            else:
                status = incoming.finish()
            self.stores += 1
            self._respond(
                context_id, encode_response(0x8001, message_id, status, sop_class, sop_instance)
            )
        elif field == C_CANCEL_RQ:
            return
        else:
            logger.warning(
                "%s sent DIMSE command 0x%04X, which this node does not offer",
                self.calling_ae,
                field,
            )
            self._respond(
                context_id,
                encode_response(
                    (field | 0x8000) & 0xFFFF, message_id, STATUS_UNRECOGNIZED_OPERATION, sop_class
                ),
            )

    def _respond(self, context_id: int, command: bytes) -> None:
        limit = self.peer_max_pdu - 6 if self.peer_max_pdu else len(command)
        limit = max(limit, 1)
        chunks = [command[i : i + limit] for i in range(0, len(command), limit)]
        out = bytearray()
        for index, chunk in enumerate(chunks):
            control = 0x03 if index == len(chunks) - 1 else 0x01
            pdv = struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk
            out += _pdu(P_DATA_TF, pdv)
        self.send(bytes(out))


# ---------------------------------------------------------------------- the server
class StorageServer:
    """Listening socket + one thread per association; the interface of pynetdicom's
    ``ThreadedAssociationServer`` that the service uses (``server_address``, ``shutdown``)."""

    def __init__(
        self,
        settings: NodeSettings,
        store: StoreContext,
        policy: AccessPolicy,
    ) -> None:
        self.settings = settings
        self.store = store
        self.policy = policy
        self.negotiate = Negotiator(supported_contexts(), settings.max_pdu_size)
        self._lock = threading.Lock()
        self._open: set[Association] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((settings.bind_address, settings.port))
        self.socket.listen(max(64, settings.max_associations * 2))
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)

    def start(self) -> StorageServer:
        self._thread.start()
        return self

    @property
    def active_associations(self) -> list[Association]:
        """The associations accepted and not yet ended."""
        with self._lock:
            return list(self._open)

    def admit(self, association: Association) -> bool:
        with self._lock:
            if len(self._open) >= self.settings.max_associations:
                return False
            self._open.add(association)
            return True

    def leave(self, association: Association) -> None:
        with self._lock:
            self._open.discard(association)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = self.socket.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning
                continue
            if self.settings.tcp_nodelay:
                try:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            conn.settimeout(self.settings.network_timeout)
            association = Association(conn, address, self)
            thread = threading.Thread(
                target=self._run, args=(association,), name=f"assoc-{address[0]}", daemon=True
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _run(self, association: Association) -> None:
        try:
            association.run()
        except Exception:  # noqa: BLE001 - one association must never take the server down
            logger.exception("association from %s failed", association.host)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, close open associations (their unfinished instances are dropped)."""
        self._stopping.set()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()
        self._thread.join(timeout)
        with self._lock:
            associations = list(self._open)
            threads = list(self._threads)
        for association in associations:
            try:
                association.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
