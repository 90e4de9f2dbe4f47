"""The upper-layer engine (``dicom_node.ulp``) spoken to with raw PDUs over a real socket:
negotiation (and its cache), fragmented messages, protocol errors, aborts and timeouts."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from test_node_support import dataset_bytes, free_port, synthetic_cr

from dicom_node.handlers import StoreContext
from dicom_node.scp import start_scp
from dicom_node.service import make_record_many, make_recorder, open_worklist
from dicom_node.settings import load_settings
from dicom_node.ulp import decode_command

VERIFICATION = "1.2.840.10008.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@dataclass
class Scp:
    port: int
    storage: Path
    store: StoreContext
    worklist: object


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Scp]:
    storage = tmp_path / "storage"
    settings = load_settings(
        None,
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage": storage,
            "allow_ae": ["RAWSCU", "OTHERSCU"],
            "network_timeout": 1.0,
        },
    )
    worklist = open_worklist(settings)
    store = StoreContext(
        storage=storage, record=make_recorder(worklist), record_many=make_record_many(worklist)
    )
    server = start_scp(settings, store)
    try:
        yield Scp(settings.port, storage, store, worklist)
    finally:
        server.shutdown()
        worklist.dispose()


def associate_rq(
    calling: str = "RAWSCU",
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = (
        (1, VERIFICATION, (IMPLICIT,)),
        (3, CR_STORAGE, (EXPLICIT, IMPLICIT)),
    ),
    application_context: str = "1.2.840.10008.3.1.1.1",
) -> bytes:
    """An A-ASSOCIATE-RQ PDU, encoded by pynetdicom's PDU classes."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = application_context
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "CXR_TRIAGE"
    items = []
    for context_id, abstract, syntaxes in contexts:
        item = build_context(abstract, list(syntaxes))
        item.context_id = context_id
        items.append(item)
    primitive.presentation_context_definition_list = items
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def element(tag_element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0, tag_element, len(value)) + value


def command(field: int, message_id: int, sop_class: str, sop_uid: str = "", data: bool = False):
    body = element(0x0002, sop_class.encode())
    body += element(0x0100, struct.pack("<H", field))
    body += element(0x0110, struct.pack("<H", message_id))
    if field == 0x0001:
        body += element(0x0700, struct.pack("<H", 0))
    body += element(0x0800, struct.pack("<H", 0x0000 if data else 0x0101))
    if sop_uid:
        body += element(0x1000, sop_uid.encode())
    return element(0x0000, struct.pack("<I", len(body))) + body


def pdv(context_id: int, fragment: bytes, is_command: bool, last: bool) -> bytes:
    control = (0x01 if is_command else 0) | (0x02 if last else 0)
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


class Peer:
    """A raw TCP peer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, count: int) -> bytes:
        out = b""
        while len(out) < count:
            chunk = self.sock.recv(count - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {count} bytes")
            out += chunk
        return out

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBI", self.read(6))
        return pdu_type, self.read(length)

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def associate(self, rq: bytes | None = None) -> bytes:
        self.send(rq or associate_rq())
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got 0x{pdu_type:02X} {body!r}"
        return body

    def response(self) -> dict[int, bytes]:
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x04, f"expected P-DATA-TF, got 0x{pdu_type:02X}"
        (length,) = struct.unpack(">I", body[:4])
        assert body[5] == 0x03  # command, last fragment
        return decode_command(body[6 : 4 + length])

    def release(self) -> None:
        self.send(pdu(0x05, b"\x00" * 4))
        assert self.read_pdu()[0] == 0x06
        self.sock.close()


def _status(rsp: dict[int, bytes]) -> int:
    return int(struct.unpack("<H", rsp[0x0900])[0])


def _nothing_left(storage: Path) -> bool:
    return not list((storage / "spool").rglob("*.dcm")) and not list(
        (storage / "spool" / ".incoming").iterdir()
    )


def test_fragmented_store_and_echo_in_one_association(scp: Scp, tmp_path: Path) -> None:
    path = synthetic_cr(tmp_path / "a.dcm", size=96, seed=1)
    ds = pydicom.dcmread(path)
    data = dataset_bytes(path)
    peer = Peer(scp.port)
    ac = peer.associate()
    assert b"1.2.840.10008.3.1.1.1" in ac
    peer.send(pdu(0x04, pdv(1, command(0x0030, 1, VERIFICATION), True, True)))
    assert _status(peer.response()) == 0x0000
    # the command in two fragments, the data set in 1000-byte fragments, several per PDU
    cmd = command(0x0001, 2, CR_STORAGE, str(ds.SOPInstanceUID), data=True)
    peer.send(pdu(0x04, pdv(3, cmd[:20], True, False)) + pdu(0x04, pdv(3, cmd[20:], True, True)))
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    for start in range(0, len(pieces), 4):
        group = pieces[start : start + 4]
        body = b"".join(
            pdv(3, piece, False, start + k == len(pieces) - 1) for k, piece in enumerate(group)
        )
        peer.send(pdu(0x04, body))
    rsp = peer.response()
    assert _status(rsp) == 0x0000
    assert struct.unpack("<H", rsp[0x0120])[0] == 2  # Message ID Being Responded To
    assert rsp[0x1000].rstrip(b"\x00").decode() == str(ds.SOPInstanceUID)
    peer.release()
    stored = next((scp.storage / "spool").rglob("*.dcm"))
    assert dataset_bytes(stored) == data  # the bytes as received
    assert pydicom.dcmread(stored).file_meta.SourceApplicationEntityTitle == "RAWSCU"


def test_negotiation_cache_echoes_titles_and_still_applies_the_allow_list(scp: Scp) -> None:
    for calling in ("RAWSCU", "OTHERSCU"):
        rq = associate_rq(calling)
        peer = Peer(scp.port)
        ac = peer.associate(rq)
        assert ac[4:36] == rq[10:42]  # Called and Calling AE title fields, as received
        peer.release()
    peer = Peer(scp.port)  # the same proposal from an AE that is not allowed: rejected
    peer.send(associate_rq("INTRUDER"))
    pdu_type, body = peer.read_pdu()
    assert pdu_type == 0x03 and body[1:4] == b"\x01\x01\x03"


def test_unsupported_application_context_is_rejected(scp: Scp) -> None:
    peer = Peer(scp.port)
    peer.send(associate_rq(application_context="1.2.3.4"))
    pdu_type, body = peer.read_pdu()
    assert pdu_type == 0x03 and body[1:4] == b"\x01\x01\x02"


@pytest.mark.parametrize(
    "opening",
    [
        pdu(0x04, pdv(1, b"\x00" * 8, True, True)),  # P-DATA before any association
        pdu(0x01, b"\x00\x01\x00\x00" + b"garbage" * 5),  # undecodable request
    ],
    ids=["pdata-first", "garbage-request"],
)
def test_protocol_errors_before_association_abort(scp: Scp, opening: bytes) -> None:
    peer = Peer(scp.port)
    peer.send(opening)
    pdu_type, _body = peer.read_pdu()
    assert pdu_type == 0x07  # A-ABORT
    assert peer.closed()
    peer = Peer(scp.port)  # and the node still serves
    peer.associate()
    peer.release()


def test_unknown_context_and_peer_abort_leave_nothing(scp: Scp, tmp_path: Path) -> None:
    path = synthetic_cr(tmp_path / "a.dcm", size=64, seed=2)
    ds = pydicom.dcmread(path)
    data = dataset_bytes(path)
    cmd = command(0x0001, 1, CR_STORAGE, str(ds.SOPInstanceUID), data=True)
    # half a data set, then A-ABORT from the peer
    peer = Peer(scp.port)
    peer.associate()
    peer.send(pdu(0x04, pdv(3, cmd, True, True)))
    peer.send(pdu(0x04, pdv(3, data[: len(data) // 2], False, False)))
    peer.send(pdu(0x07, b"\x00\x00\x00\x00"))
    assert peer.closed()
    # a PDV on a presentation context that was never negotiated
    peer = Peer(scp.port)
    peer.associate()
    peer.send(pdu(0x04, pdv(5, cmd, True, True)))
    assert peer.read_pdu()[0] == 0x07
    assert peer.closed()
    deadline = time.monotonic() + 5
    while scp.store.concurrent() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _nothing_left(scp.storage)
    assert scp.store.stats == {}


def test_unrecognised_command_gets_0211_and_the_association_goes_on(scp: Scp) -> None:
    peer = Peer(scp.port)
    peer.associate()
    peer.send(pdu(0x04, pdv(1, command(0x0020, 7, VERIFICATION), True, True)))  # C-FIND-RQ
    rsp = peer.response()
    assert _status(rsp) == 0x0211
    assert struct.unpack("<H", rsp[0x0100])[0] == 0x8020
    peer.send(pdu(0x04, pdv(1, command(0x0030, 8, VERIFICATION), True, True)))
    assert _status(peer.response()) == 0x0000
    peer.release()


def test_silent_peer_is_aborted_after_the_network_timeout(scp: Scp) -> None:
    peer = Peer(scp.port)
    peer.associate()
    started = time.monotonic()
    pdu_type, _ = peer.read_pdu()  # nothing sent: the node gives up after network_timeout
    assert pdu_type == 0x07
    assert 0.5 < time.monotonic() - started < 5
    assert peer.closed()
