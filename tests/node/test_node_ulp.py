"""The upper-layer engine (``dicom_node.net.ulp``) spoken to with raw PDUs over a real socket:
negotiation (and its cache), fragmented messages, protocol errors, aborts and timeouts."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from test_node_support import dataset_bytes, free_port, needs_dcmtk, storescu, synthetic_cr

from dicom_node.ingest.spool import StoreContext, make_recorder
from dicom_node.net.dimse import decode_command
from dicom_node.net.server import StorageServer
from dicom_node.node import open_worklist
from dicom_node.settings import load_settings
from dicom_node.stages.receive import start_scp

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
    server: StorageServer


@contextlib.contextmanager
def running_scp(tmp_path: Path, **overrides: object) -> Iterator[Scp]:
    """Our SCP in this process, with short timeouts and a small pending cap."""
    storage = tmp_path / "storage"
    settings = load_settings(
        None,
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage": storage,
            "allow_ae": ["RAWSCU", "OTHERSCU", "STORESCU"],
            "network_timeout": 1.0,
            "artim_timeout": 1.0,
            "max_pending_connections": 4,
            **overrides,
        },
    )
    worklist = open_worklist(settings)
    store = StoreContext(storage=storage, record=make_recorder(worklist))
    server = start_scp(settings, store)
    try:
        yield Scp(settings.port, storage, store, worklist, server)
    finally:
        server.shutdown()
        worklist.dispose()


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Scp]:
    with running_scp(tmp_path) as running:
        yield running


def associate_rq(
    calling: str = "RAWSCU",
    called: str = "CXR_TRIAGE",
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
    primitive.called_ae_title = called
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


# ---------------------------------------------------------------------- PS3.8 bounds and codes
def _abort_codes(peer: Peer) -> tuple[int, int]:
    """The (source, reason) of the A-ABORT the node sends, after which it closes."""
    pdu_type, body = peer.read_pdu()
    assert pdu_type == 0x07, f"expected A-ABORT, got 0x{pdu_type:02X}"
    assert len(body) == 4
    assert peer.closed()
    return body[2], body[3]


def _reject_codes(peer: Peer) -> tuple[int, int, int]:
    pdu_type, body = peer.read_pdu()
    assert pdu_type == 0x03, f"expected A-ASSOCIATE-RJ, got 0x{pdu_type:02X}"
    assert peer.closed()
    return body[1], body[2], body[3]


def _still_serves(port: int) -> None:
    peer = Peer(port)
    peer.associate()
    peer.send(pdu(0x04, pdv(1, command(0x0030, 1, VERIFICATION), True, True)))
    assert _status(peer.response()) == 0x0000
    peer.release()


def test_called_ae_must_be_ours_unless_any_is_accepted(tmp_path: Path) -> None:
    with running_scp(tmp_path) as scp:
        peer = Peer(scp.port)
        peer.send(associate_rq(called="WRONG_AE"))
        assert _reject_codes(peer) == (1, 1, 7)  # called-AE-title-not-recognized
        peer = Peer(scp.port)
        peer.send(associate_rq(calling="INTRUDER"))
        assert _reject_codes(peer) == (1, 1, 3)  # calling-AE-title-not-recognized
    with running_scp(tmp_path, accept_any_called_ae=True) as scp:
        Peer(scp.port).associate(associate_rq(called="WRONG_AE"))


def test_protocol_version_and_oversized_requests_are_rejected(scp: Scp) -> None:
    rq = bytearray(associate_rq())
    rq[6:8] = b"\x00\x02"  # protocol version without bit 0
    peer = Peer(scp.port)
    peer.send(bytes(rq))
    assert _reject_codes(peer) == (1, 2, 2)  # protocol-version-not-supported
    peer = Peer(scp.port)  # a length over our bound: rejected before the body is read
    peer.send(struct.pack(">BBI", 0x01, 0, (64 << 10) + 1) + bytes(rq[6:]))
    assert _reject_codes(peer) == (1, 3, 2)  # local-limit-exceeded
    many = tuple((1, CR_STORAGE, tuple(f"1.2.3.{i}" for i in range(33))) for _ in range(1))
    peer = Peer(scp.port)
    peer.send(associate_rq(contexts=many))
    assert _reject_codes(peer) == (1, 3, 2)
    rq = associate_rq()
    user_info = rq.rindex(b"\x50\x00")  # the last item: append 513 empty sub-items to it
    extra = b"\x55\x00\x00\x00" * 513
    length = struct.unpack(">H", rq[user_info + 2 : user_info + 4])[0] + len(extra)
    body = rq[6:user_info] + b"\x50\x00" + struct.pack(">H", length) + rq[user_info + 4 :] + extra
    peer = Peer(scp.port)
    peer.send(pdu(0x01, body))
    assert _reject_codes(peer) == (1, 3, 2)
    _still_serves(scp.port)


@pytest.mark.parametrize(
    ("name", "data", "codes"),
    [
        ("release-rq 2 GB", pdu(0x05, b"")[:2] + struct.pack(">I", 2_000_000_000), (2, 6)),
        ("release-rq 0 bytes", pdu(0x05, b""), (2, 6)),
        ("release-rq 5 bytes", pdu(0x05, b"\x00" * 5), (2, 6)),
        ("abort 2^32-1", pdu(0x07, b"")[:2] + b"\xff\xff\xff\xff", (2, 6)),
        ("p-data over max pdu", pdu(0x04, b"")[:2] + struct.pack(">I", (1 << 20) + 1), (2, 6)),
        ("p-data empty", pdu(0x04, b""), (2, 6)),
        ("pdv overruns its pdu", pdu(0x04, struct.pack(">IBB", 100, 1, 3) + b"\x00" * 8), (2, 6)),
        (
            "pdv of unknown context",
            pdu(0x04, pdv(7, command(0x0030, 1, VERIFICATION), 1, 1)),
            (2, 6),
        ),
        ("second associate-rq", associate_rq(), (2, 2)),
        ("release-rp", pdu(0x06, b"\x00" * 4), (2, 2)),
        ("pdu type 0x09", pdu(0x09, b"\x00" * 4), (2, 1)),
        (
            "command set not group 0",
            pdu(0x04, pdv(1, b"\x08\x00\x00\x00" + b"\x00" * 4, 1, 1)),
            (0, 0),
        ),
    ],
)
def test_bad_pdus_in_an_association_abort_with_ps38_codes(
    scp: Scp, name: str, data: bytes, codes: tuple[int, int]
) -> None:
    peer = Peer(scp.port)
    peer.associate()
    peer.send(data)
    assert _abort_codes(peer) == codes, name
    _still_serves(scp.port)


def test_c_store_whose_class_is_not_its_contexts_gets_0122_and_nothing_is_stored(
    scp: Scp, tmp_path: Path
) -> None:
    path = synthetic_cr(tmp_path / "a.dcm", size=32, seed=3)
    data = dataset_bytes(path)
    sop = str(pydicom.dcmread(path).SOPInstanceUID)
    peer = Peer(scp.port)
    peer.associate()
    ct_storage = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage, on the CR context
    peer.send(pdu(0x04, pdv(3, command(0x0001, 5, ct_storage, sop, data=True), True, True)))
    peer.send(pdu(0x04, pdv(3, data, False, True)))
    rsp = peer.response()
    assert _status(rsp) == 0x0122
    peer.send(pdu(0x04, pdv(1, command(0x0030, 6, VERIFICATION), True, True)))  # still in step
    assert _status(peer.response()) == 0x0000
    peer.release()
    assert _nothing_left(scp.storage)


def test_artim_closes_silent_and_trickling_connections_without_a_pdu(scp: Scp) -> None:
    silent = Peer(scp.port)
    trickle = Peer(scp.port)
    rq = associate_rq()
    started = time.monotonic()
    with contextlib.suppress(OSError):
        for byte in rq[:30]:  # one byte every 0.2 s: each read is quick, the whole is not
            trickle.send(bytes([byte]))
            time.sleep(0.2)
    assert trickle.closed(timeout=5) and silent.closed(timeout=5)
    assert time.monotonic() - started < 4  # artim_timeout = 1 s
    _still_serves(scp.port)


def test_idle_connections_are_capped_and_the_oldest_evicted(scp: Scp) -> None:
    idle = [Peer(scp.port) for _ in range(10)]  # max_pending_connections = 4
    time.sleep(0.3)
    assert scp.server.pending_connections <= 4
    _still_serves(scp.port)  # a peer that associates at once gets in
    assert sum(p.closed(timeout=0.2) for p in idle) >= 6


def test_one_log_line_per_association(scp: Scp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dicom_node.net")
    _still_serves(scp.port)
    peer = Peer(scp.port)
    peer.send(associate_rq(called="WRONG_AE"))
    _reject_codes(peer)
    time.sleep(0.2)
    lines = [r for r in caplog.records if r.getMessage().startswith("association ")]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    released, rejected = sorted(lines, key=lambda r: r.levelno)
    text = released.getMessage()
    assert released.levelno == logging.INFO
    assert "RAWSCU -> CXR_TRIAGE" in text and "127.0.0.1:" in text and ": released;" in text
    assert "2 of 2 context(s) accepted, 0 stored" in text and text.endswith(" s")
    assert rejected.levelno == logging.WARNING
    assert "called-AE-title-not-recognized" in rejected.getMessage()


@needs_dcmtk
def test_storescu_fills_our_smallest_pdu_without_an_abort(tmp_path: Path) -> None:
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=128, seed=i) for i in range(3)]
    with running_scp(tmp_path, max_pdu_size=4096) as scp:
        proc = storescu(scp.port, files)
        assert proc.returncode == 0, proc.stderr
        assert len(list((scp.storage / "spool").rglob("*.dcm"))) == 3


def test_hostile_ae_title_bytes_neither_match_nor_reach_the_log(
    scp: Scp, caplog: pytest.LogCaptureFixture
) -> None:
    rq = bytearray(associate_rq())
    rq[26:42] = b"RAWSCU\nINFO fake"  # a newline to forge a log line
    peer = Peer(scp.port)
    peer.send(bytes(rq))
    assert _reject_codes(peer) == (1, 1, 3)
    time.sleep(0.2)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "RAWSCU?INFO fake -> CXR_TRIAGE" in text and "RAWSCU\nINFO" not in text
