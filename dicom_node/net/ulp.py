"""The receive side of the DICOM upper layer (PS3.8) and DIMSE (PS3.7) for ``triage serve``.

A storage SCP that answers C-ECHO and C-STORE on blocking sockets, one thread per connection.
It replaces pynetdicom's acceptor on the receive path only, for speed: pynetdicom hands every
PDU from a polling reactor thread to the association thread through queues, which costs 2.5 to
4 ms per C-STORE (pynetdicom issue 701), several times what DCMTK's ``storescp`` spends in all.
Here a C-STORE costs a few socket reads, and its data set goes to disk as it arrives.
Negotiation is pynetdicom's (:mod:`dicom_node.net.negotiation`); the sending side
(:mod:`dicom_node.net.scu`) is pynetdicom.

The acceptor's states and actions (PS3.8 Table 9-10), as this engine implements them
-----------------------------------------------------------------------------------------
Sta2, transport open, awaiting A-ASSOCIATE-RQ (ARTIM running, ``artim_timeout``; TLS
handshake first on a TLS port):

* A-ASSOCIATE-RQ (Evt6, AE-6): its length is bounded before it is read
  (:data:`~dicom_node.net.limits.MAX_ASSOCIATE_RQ`, else A-ASSOCIATE-RJ local-limit-exceeded);
  then the AE titles (:class:`~dicom_node.net.policy.AccessPolicy`), the shape of the request,
  its negotiation and ``max_associations`` decide between A-ASSOCIATE-AC (-> Sta6) and
  A-ASSOCIATE-RJ with the codes of PS3.8 Table 9-21 (-> Sta13).
* A-ABORT (Evt16, AA-2): close. ARTIM expiry (Evt18, AA-2): close, nothing sent.
* any other PDU, or an invalid one (Evt3/4/10/12/13/19, AA-1): A-ABORT (source service-user)
  -> Sta13.
* The connection is evicted (closed) when ``max_pending_connections`` newer ones are waiting.

Sta6, association established:

* P-DATA-TF (Evt10, DT-2): at most our maximum PDU length; each PDV fits its PDU and names an
  accepted presentation context, else A-ABORT (service-provider, invalid-PDU-parameter-value).
  Command fragments are reassembled (at most :data:`~dicom_node.net.limits.MAX_COMMAND_SET`),
  data set fragments go to the instance's file as they are read.
* A-RELEASE-RQ (Evt12, AR-2 then AR-4): body exactly 4 bytes; A-RELEASE-RP -> Sta13.
* A-ABORT (Evt16, AA-3): body exactly 4 bytes; close, the instance being received is dropped.
* A-ASSOCIATE-RQ/AC/RJ, A-RELEASE-RP (AA-8): A-ABORT (service-provider, unexpected-PDU);
  an unknown PDU type (Evt19, AA-8): A-ABORT (service-provider, unrecognized-PDU).
* Nothing for ``network_timeout`` (not an ARTIM case, our own bound): A-ABORT
  (service-provider, reason-not-specified).

Sta13, awaiting transport close: the peer has :data:`~dicom_node.net.limits.CLOSE_LINGER`
seconds to close, and what it still sends is read and dropped (at most
:data:`~dicom_node.net.limits.CLOSE_DRAIN` bytes).

DIMSE: C-ECHO-RQ -> success; C-STORE-RQ -> the instance (durable write, then its status),
0x0122 when its Affected SOP Class UID is not its context's abstract syntax (nothing is
stored); any other command -> 0x0211; a command set we cannot decode -> A-ABORT
(service-user). Each connection that sent an A-ASSOCIATE-RQ ends with one log line.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from dicom_node.net import limits
from dicom_node.net.dimse import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    COMMAND_FIELD,
    DATASET_TYPE,
    MESSAGE_ID,
    NO_DATASET,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    STATUS_UNRECOGNIZED_OPERATION,
    DimseError,
    command_uid,
    command_us,
    decode_command,
    encode_response,
)
from dicom_node.net.negotiation import Negotiated, ae_titles
from dicom_node.net.pdu import (
    ABORT_BY_USER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU,
    RELEASE_RP,
    REQUEST_TOO_LARGE,
    TOO_MANY_ASSOCIATIONS,
    Abort,
    LimitExceeded,
    PduType,
    PeerGone,
    ProtocolError,
    Rejection,
    abort_pdu,
    p_data,
    reject_pdu,
)

if TYPE_CHECKING:
    from dicom_node.net.negotiation import Negotiator
    from dicom_node.net.policy import AccessPolicy

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">BBI")
_PDV = struct.Struct(">IBB")
_PDU_TYPES = frozenset(int(t) for t in PduType)


class State(Enum):
    """The acceptor states this engine passes through (PS3.8 Table 9-10)."""

    STA2 = "Sta2: transport open, awaiting A-ASSOCIATE-RQ"
    STA6 = "Sta6: association established, ready for data transfer"
    STA13 = "Sta13: awaiting transport close"


class Incoming(Protocol):
    """One C-STORE data set being received (the ingest side implements it)."""

    def write(self, piece: memoryview) -> None: ...
    def finish(self) -> int: ...
    def discard(self, reason: str) -> None: ...


class OpenInstance(Protocol):
    """Starts an :class:`Incoming` for a C-STORE-RQ whose data set follows."""

    def __call__(
        self,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str,
        context_class: str,
    ) -> Incoming: ...


class AssociationHost(Protocol):
    """What an :class:`Association` needs from the server that accepted it
    (:class:`dicom_node.net.server.StorageServer`), named here so that the server imports the
    association and not the other way round."""

    limits: limits.Limits
    policy: AccessPolicy
    negotiate: Negotiator
    open_instance: OpenInstance
    ssl_context: ssl.SSLContext | None

    def admit(self, association: Association) -> bool: ...

    def leave(self, association: Association) -> None: ...

    def tls_failed(self, peer: str, reason: str) -> None: ...


# ---------------------------------------------------------------------- reading
class Reader:
    """Exact reads from a blocking socket, small ones served from a buffer.

    ``deadline`` (a ``time.monotonic()`` value) bounds the total time of every read while it is
    set: the ARTIM timer, which a peer sending one byte at a time cannot stretch.
    """

    def __init__(self, sock: socket.socket, size: int = limits.READ_BUFFER_PENDING) -> None:
        self.sock = sock
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0
        self.deadline: float | None = None

    def grow(self, size: int) -> None:
        """A larger buffer (after association), keeping what is buffered."""
        if size <= len(self.buffer):
            return
        buffered = self.buffer[self.start : self.end]
        self.view.release()
        self.buffer = bytearray(size)
        self.buffer[: len(buffered)] = buffered
        self.view = memoryview(self.buffer)
        self.start, self.end = 0, len(buffered)

    def _recv_into(self, target: memoryview, count: int) -> int:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("ARTIM expired")
            self.sock.settimeout(remaining)
        received = self.sock.recv_into(target, count)
        if not received:
            raise PeerGone("connection closed by the peer")
        return received

    def exact(self, count: int) -> bytes:
        """``count`` bytes (headers and control PDUs; callers bound ``count`` first)."""
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
                self.end += self._recv_into(self.view[self.end :], len(self.buffer) - self.end)
        out = bytes(self.view[self.start : self.start + count])
        self.start += count
        return out

    def into(self, target: memoryview) -> None:
        """Fill ``target`` completely (buffered bytes first, then straight from the socket)."""
        filled = min(self.end - self.start, len(target))
        if filled:
            target[:filled] = self.view[self.start : self.start + filled]
            self.start += filled
        while filled < len(target):
            filled += self._recv_into(target[filled:], len(target) - filled)

    def stream(self, count: int, sink: Callable[[memoryview], None]) -> None:
        """Pass ``count`` bytes to ``sink`` in pieces of at most the buffer's size."""
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


def _drop(_piece: memoryview) -> None:
    """Sink of a data set that is read and not kept."""


def close(sock: socket.socket, linger: bool) -> None:
    """Sta13: after our last PDU, let the peer read it and close first (at most
    :data:`~dicom_node.net.limits.CLOSE_LINGER` seconds and
    :data:`~dicom_node.net.limits.CLOSE_DRAIN` bytes read and dropped), then close."""
    if linger:
        try:
            if not isinstance(sock, ssl.SSLSocket):
                sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + limits.CLOSE_LINGER
            drained = 0
            while drained < limits.CLOSE_DRAIN:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                data = sock.recv(4096)
                if not data:
                    break
                drained += len(data)
        except (OSError, ValueError):
            pass
    try:
        sock.close()
    except OSError:
        pass


# ---------------------------------------------------------------------- one connection
class Association:
    """One accepted connection, from Sta2 to Sta13."""

    def __init__(
        self, sock: socket.socket, address: tuple[str, int], server: AssociationHost
    ) -> None:
        self.sock = sock
        self.host = str(address[0])
        self.peer = f"{address[0]}:{address[1]}"
        self.server = server
        self.limits = server.limits
        self.state = State.STA2
        self.accepted_at = time.monotonic()
        self.reader = Reader(sock)
        self.calling_ae = ""
        self.called_ae = ""
        self.tls = ""
        self.contexts: dict[int, tuple[str, str]] = {}
        self.proposed = 0
        self.peer_max_pdu = 0
        self.incoming: Incoming | None = None
        self.refusal: int | None = None  # status for the C-STORE whose data set is arriving
        self.stored = 0
        self.refused = 0
        self.ended = ""
        self.evicted = False

    # -------------------------------------------------------------- life cycle
    def run(self) -> None:
        """Serve the connection to its end, then log one line if it asked to associate."""
        sent_last_pdu = False
        try:
            self.reader.deadline = self.accepted_at + self.limits.artim_timeout
            if self.server.ssl_context is not None:
                self._tls_handshake(self.server.ssl_context)
            if self._associate():
                self._serve()
            sent_last_pdu = True
        except PeerGone as exc:
            self.ended = self.ended or str(exc)
        except TimeoutError:
            if self.state is State.STA2:
                self.ended = (
                    f"ARTIM expired: no A-ASSOCIATE-RQ within {self.limits.artim_timeout:g} s"
                )
            else:
                self._abort(ABORT_NOT_SPECIFIED)
                self.ended = (
                    f"aborted ({ABORT_NOT_SPECIFIED}): nothing received for "
                    f"{self.limits.network_timeout:g} s"
                )
                sent_last_pdu = True
        except ProtocolError as exc:
            abort = exc.abort if self.state is State.STA6 else ABORT_BY_USER
            self._abort(abort)
            self.ended = f"aborted ({abort}): {exc}"
            sent_last_pdu = True
        except ssl.SSLError as exc:
            self.ended = f"TLS: {exc.reason or exc}"
        except OSError as exc:
            self.ended = "evicted (max_pending_connections)" if self.evicted else f"{exc}"
        finally:
            self.state = State.STA13
            if self.incoming is not None:
                self.incoming.discard("association ended inside a data set")
                self.incoming = None
            self._log_end()
            close(self.sock, linger=sent_last_pdu and not self.evicted)
            self.server.leave(self)  # only now: a lingering connection still counts

    def evict(self) -> None:
        """Close a connection that has not associated yet (the pending cap was reached)."""
        self.evicted = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _tls_handshake(self, context: ssl.SSLContext) -> None:
        tls = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        self.reader.sock = tls
        deadline = self.reader.deadline or time.monotonic()
        tls.settimeout(max(deadline - time.monotonic(), 0.001))
        tls.do_handshake()
        self.tls = str(tls.version() or "TLS")

    def _abort(self, abort: Abort) -> None:
        try:
            self.sock.sendall(abort_pdu(abort))
        except OSError:
            pass

    def _log_end(self) -> None:
        if not self.calling_ae and not self.called_ae:
            # no complete A-ASSOCIATE-RQ (port probe, flood, ARTIM, TLS failure)
            logger.debug("connection from %s ended: %s", self.peer, self.ended)
            if self.ended.startswith("TLS"):
                self.server.tls_failed(self.peer, self.ended)  # logged at a bounded rate
            return
        seconds = time.monotonic() - self.accepted_at
        log = logger.info if self.ended == "released" else logger.warning
        log(
            "association %s %s -> %s%s: %s; %d of %d context(s) accepted, %d stored, "
            "%d refused, %.2f s",
            self.peer,
            self.calling_ae,
            self.called_ae,
            f" ({self.tls})" if self.tls else "",
            self.ended,
            len(self.contexts),
            self.proposed,
            self.stored,
            self.refused,
            seconds,
        )

    # -------------------------------------------------------------- Sta2
    def _associate(self) -> bool:
        """Sta2 -> Sta6 (True) or Sta13 after an A-ASSOCIATE-RJ (False)."""
        pdu_type, _reserved, length = _HEADER.unpack(self.reader.exact(limits.PDU_HEADER))
        if pdu_type == PduType.A_ABORT:  # AA-2
            raise PeerGone("A-ABORT before association")
        if pdu_type != PduType.A_ASSOCIATE_RQ:  # AA-1
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
        if length < limits.ASSOCIATE_RQ_FIXED:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes")
        if length > limits.MAX_ASSOCIATE_RQ:
            self.called_ae = "?"  # never read: the rejection is still logged as an association
            return self._reject(REQUEST_TOO_LARGE, f"A-ASSOCIATE-RQ of {length} bytes")
        rq = _HEADER.pack(pdu_type, 0, length) + self.reader.exact(length)
        self.calling_ae, self.called_ae = ae_titles(rq)
        server = self.server
        rejection = server.policy.check(self.calling_ae, self.called_ae, self.host)
        if rejection is not None:
            return self._reject(rejection)
        try:
            answer: Negotiated | Rejection = server.negotiate(rq)
        except LimitExceeded as exc:
            return self._reject(REQUEST_TOO_LARGE, str(exc))
        if isinstance(answer, Rejection):
            return self._reject(answer)
        if not server.admit(self):
            return self._reject(
                TOO_MANY_ASSOCIATIONS, f"{self.limits.max_associations} associations open"
            )
        self.contexts = answer.contexts
        self.proposed = answer.proposed
        self.peer_max_pdu = answer.peer_max_pdu
        self.sock.sendall(answer.ac_pdu)
        self.state = State.STA6
        self.reader.deadline = None
        self.sock.settimeout(self.limits.network_timeout)
        self.reader.grow(limits.READ_BUFFER)
        return True

    def _reject(self, rejection: Rejection, detail: str = "") -> bool:
        self.sock.sendall(reject_pdu(rejection))
        self.ended = f"rejected: {rejection}" + (f", {detail}" if detail else "")
        return False

    # -------------------------------------------------------------- Sta6
    def _serve(self) -> None:
        """Sta6 until A-RELEASE-RQ (returns) or an abort (raises)."""
        reader = self.reader
        max_pdu = self.limits.max_pdu
        command = bytearray()
        parsed: dict[int, bytes] | None = None
        context_id = 0
        while True:
            pdu_type, _reserved, length = _HEADER.unpack(reader.exact(limits.PDU_HEADER))
            if pdu_type == PduType.P_DATA_TF:
                if length > max_pdu or length < limits.PDV_HEADER:
                    raise ProtocolError(f"P-DATA-TF of {length} bytes (our maximum: {max_pdu})")
                remaining = length
                while remaining:
                    if remaining < limits.PDV_HEADER:
                        raise ProtocolError("P-DATA-TF ends inside a PDV header")
                    pdv_length, pdv_context, control = _PDV.unpack(reader.exact(limits.PDV_HEADER))
                    if pdv_length < 2 or pdv_length + 4 > remaining:
                        raise ProtocolError(f"PDV of {pdv_length} bytes overruns its P-DATA-TF")
                    if pdv_context not in self.contexts:
                        raise ProtocolError(f"PDV for presentation context {pdv_context}")
                    remaining -= 4 + pdv_length
                    fragment = pdv_length - 2
                    if control & 0x01:  # command fragment
                        if parsed is not None:
                            raise DimseError("a command arrived before the data set")
                        if len(command) + fragment > limits.MAX_COMMAND_SET:
                            raise DimseError("command set over its bound")
                        command += reader.exact(fragment)
                        context_id = pdv_context
                        if control & 0x02:
                            parsed = decode_command(command)
                            command = bytearray()
                            if command_us(parsed, DATASET_TYPE) == NO_DATASET:
                                self._dispatch(parsed, context_id)
                                parsed = None
                            else:
                                self._begin_dataset(parsed, context_id)
                    else:
                        if parsed is None:
                            raise DimseError("a data set fragment arrived without a command")
                        if pdv_context != context_id:
                            raise DimseError("data set on another context than its command")
                        incoming = self.incoming
                        reader.stream(fragment, _drop if incoming is None else incoming.write)
                        if control & 0x02:
                            self._dispatch(parsed, context_id)
                            parsed = None
            elif pdu_type == PduType.A_RELEASE_RQ:
                self._control_body(length, "A-RELEASE-RQ")
                if self.incoming is not None or parsed is not None or command:
                    self.ended = "released inside a message (dropped)"
                self.sock.sendall(RELEASE_RP)
                self.ended = self.ended or "released"
                return
            elif pdu_type == PduType.A_ABORT:
                body = self._control_body(length, "A-ABORT")
                raise PeerGone(f"aborted by the peer (source {body[2]}, reason {body[3]})")
            elif pdu_type in _PDU_TYPES:
                raise ProtocolError(
                    f"unexpected {PduType(pdu_type).name} in Sta6", ABORT_UNEXPECTED_PDU
                )
            else:
                raise ProtocolError(f"PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)

    def _control_body(self, length: int, name: str) -> bytes:
        if length != limits.CONTROL_PDU_BODY:
            raise ProtocolError(f"{name} body of {length} bytes (must be 4)")
        return self.reader.exact(length)

    # -------------------------------------------------------------- DIMSE
    def _begin_dataset(self, command: dict[int, bytes], context_id: int) -> None:
        if command_us(command, COMMAND_FIELD) != C_STORE_RQ:
            return  # the data set of another command is read and dropped
        abstract, transfer_syntax = self.contexts[context_id]
        sop_class = command_uid(command, AFFECTED_SOP_CLASS)
        if sop_class != abstract:
            self.refusal = STATUS_SOP_CLASS_NOT_SUPPORTED
            return
        self.incoming = self.server.open_instance(
            sop_class_uid=sop_class,
            sop_instance_uid=command_uid(command, AFFECTED_SOP_INSTANCE),
            transfer_syntax=transfer_syntax,
            calling_ae=self.calling_ae,
            context_class=abstract,
        )

    def _dispatch(self, command: dict[int, bytes], context_id: int) -> None:
        field = command_us(command, COMMAND_FIELD)
        message_id = command_us(command, MESSAGE_ID)
        if field is None or message_id is None:
            raise DimseError("command set without Command Field or Message ID")
        sop_class = command_uid(command, AFFECTED_SOP_CLASS)
        if field == C_STORE_RQ:
            incoming, self.incoming = self.incoming, None
            refusal, self.refusal = self.refusal, None
            if refusal is None and sop_class != self.contexts[context_id][0]:
                refusal = STATUS_SOP_CLASS_NOT_SUPPORTED
            if incoming is not None:
                status = incoming.finish()
            else:  # refused, or a C-STORE-RQ that said it has no data set
                status = refusal if refusal is not None else STATUS_CANNOT_UNDERSTAND
            if status == STATUS_SUCCESS or (status & 0xF000) == 0xB000:
                self.stored += 1
            else:
                self.refused += 1
            sop_instance = command_uid(command, AFFECTED_SOP_INSTANCE)
            response = encode_response(0x8001, message_id, status, sop_class, sop_instance)
        elif field == C_ECHO_RQ:
            response = encode_response(0x8030, message_id, STATUS_SUCCESS, sop_class)
        elif field == C_CANCEL_RQ:
            return
        else:
            logger.warning(
                "%s sent DIMSE command 0x%04X, which this node does not offer",
                self.calling_ae,
                field,
            )
            response = encode_response(
                (field | 0x8000) & 0xFFFF, message_id, STATUS_UNRECOGNIZED_OPERATION, sop_class
            )
        self.sock.sendall(p_data(context_id, response, self.peer_max_pdu))
