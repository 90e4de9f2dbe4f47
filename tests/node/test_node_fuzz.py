"""Fuzzing the upper layer of ``triage serve`` (seeded, bounded, well under a minute).

One SCP runs in its own process (:mod:`fuzz_scp`, working folder = a folder that holds only
its storage). Three families of hostile input:

* hand-built PDUs with each length field at 0, 1, just over its limit and its maximum
  (2^32-1 for 4-byte fields, 2^16-1 for 2-byte item lengths), before and inside an
  association, down to the command set and the data set;
* random mutations (seeded) of sessions recorded from DCMTK ``storescu`` and pynetdicom;
* floods of connections that never associate.

After every case: the process is alive and answers a C-ECHO, its resident memory stayed under
``baseline + RSS_BOUND`` and its thread count under the caps, nothing appeared outside the
storage folder and no partial file is left in the spool, and a real ``storescu`` store
succeeds.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_node_support import (
    STORESCU,
    dataset_bytes,
    dcmtk_env,
    free_port,
    needs_dcmtk,
    synthetic_cr,
)
from test_node_ulp import CR_STORAGE, VERIFICATION, Peer, associate_rq, command, pdu, pdv

from dicom_node.net import limits

pytestmark = needs_dcmtk

SEED = 20261130
MUTATIONS_PER_SESSION = 40
#: The fuzzed server's settings: small caps so that the floods reach them.
MAX_PDU = 16384
MAX_PENDING = 8
MAX_ASSOCIATIONS = 4
SETTINGS = {
    "artim_timeout": "1",
    "network_timeout": "2",
    "max_pdu_size": str(MAX_PDU),
    "max_pending_connections": str(MAX_PENDING),
    "max_associations": str(MAX_ASSOCIATIONS),
}
#: Resident memory the server may gain over its warmed-up baseline, whatever a case does.
RSS_BOUND = 48 << 20
U32 = 0xFFFFFFFF
U16 = 0xFFFF


# ---------------------------------------------------------------------- the server under test
@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    workdir: Path
    storage: Path
    sample: Path
    baseline_rss: int = 0
    baseline_threads: int = 0
    peak_rss: int = 0

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def rss(self) -> int:
        return self.status("VmRSS") * 1024

    def threads(self) -> int:
        return self.status("Threads")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("fuzz-scp")
    logs = tmp_path_factory.mktemp("fuzz-log")
    sample = synthetic_cr(logs / "sample.dcm", size=16, seed=7)
    port = free_port()
    args = [f"{k}={v}" for k, v in SETTINGS.items()]
    with open(logs / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fuzz_scp.py")), str(port), "storage",
             *args],
            cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    running = Server(proc, port, workdir, workdir / "storage", sample)
    try:
        for _ in range(3):  # warm up: imports, negotiation cache, allocator arenas
            _store(running)
            _echo(running.port)
        running.baseline_rss = running.peak_rss = running.rss()
        running.baseline_threads = running.threads()
        yield running
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        print(
            f"fuzz server: baseline RSS {running.baseline_rss / 2**20:.1f} MiB, "
            f"peak after a case {running.peak_rss / 2**20:.1f} MiB"
        )


def _store(server: Server) -> None:
    proc = subprocess.run(
        [STORESCU, "-aec", "CXR_TRIAGE", "-to", "10", "127.0.0.1", str(server.port),
         str(server.sample)],
        capture_output=True, text=True, timeout=30, env=dcmtk_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"storescu after the case: {proc.stderr}"


def _echo(port: int) -> None:
    peer = Peer(port)
    peer.associate()
    peer.send(pdu(0x04, pdv(1, command(0x0030, 1, VERIFICATION), True, True)))
    assert struct.unpack("<H", peer.response()[0x0900])[0] == 0
    peer.release()


def check_after_case(server: Server, case: str) -> None:
    """The invariants every case must leave behind (``case`` names it in a failure)."""
    try:
        _check(server)
    except AssertionError as exc:
        raise AssertionError(f"after {case!r}: {exc}") from exc


def _check(server: Server) -> None:
    assert server.proc.poll() is None, "the server died"
    incoming = server.storage / "spool" / ".incoming"
    deadline = time.monotonic() + 5
    while any(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(incoming.iterdir()), "a partial instance was left in the spool"
    assert sorted(os.listdir(server.workdir)) == ["storage"], "written outside the storage"
    rss = server.rss()
    server.peak_rss = max(server.peak_rss, rss)
    assert rss <= server.baseline_rss + RSS_BOUND, (
        f"RSS grew by {(rss - server.baseline_rss) >> 20} MiB"
    )
    threads_cap = server.baseline_threads + MAX_PENDING + MAX_ASSOCIATIONS + 2
    deadline = time.monotonic() + 5
    while server.threads() > server.baseline_threads + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.threads() <= threads_cap
    _echo(server.port)
    _store(server)


def exchange(port: int, data: bytes, associate: bool = False, timeout: float = 3.0) -> bytes:
    """Send ``data`` (after an association if asked), half-close, read until the server
    closes; returns what the server sent after the association."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = bytearray()
    try:
        if associate:
            sock.sendall(associate_rq())
            head = _read_exact(sock, 6)
            assert head[0] == 0x02, f"not associated: PDU 0x{head[0]:02X}"
            _read_exact(sock, struct.unpack(">I", head[2:])[0])
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    finally:
        sock.close()
    return bytes(received)


def _read_exact(sock: socket.socket, count: int) -> bytes:
    out = b""
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


# ---------------------------------------------------------------------- hand-built PDUs
def _u32(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack(">I", value) + data[offset + 4 :]


def _u16(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack(">H", value) + data[offset + 2 :]


def _rq_length_fields(rq: bytes) -> dict[str, tuple[int, int]]:
    """Offsets of the 2-byte length of each kind of item in an A-ASSOCIATE-RQ, with the
    length each has."""
    names = {0x10: "application context", 0x20: "presentation context", 0x30: "abstract syntax",
             0x40: "transfer syntax", 0x50: "user information", 0x51: "maximum length"}  # fmt: skip
    fields: dict[str, tuple[int, int]] = {}

    def walk(start: int, end: int) -> None:
        pos = start
        while pos < end:
            kind, length = rq[pos], struct.unpack_from(">H", rq, pos + 2)[0]
            fields.setdefault(names.get(kind, f"item 0x{kind:02X}"), (pos + 2, length))
            if kind == 0x20:
                walk(pos + 8, pos + 4 + length)
            elif kind == 0x50:
                walk(pos + 4, pos + 4 + length)
            pos += 4 + length

    walk(6 + limits.ASSOCIATE_RQ_FIXED, len(rq))
    return fields


def _echo_then_release() -> bytes:
    return pdu(0x04, pdv(1, command(0x0030, 9, VERIFICATION), True, True)) + pdu(0x05, b"\0" * 4)


def hand_built_cases(sample: Path) -> list[tuple[str, bool, bytes]]:
    """``(name, inside an association, bytes)`` for every length field and value."""
    rq = associate_rq()
    tail = _echo_then_release()
    cases: list[tuple[str, bool, bytes]] = []
    # --- before association
    for value in (0, 1, limits.MAX_ASSOCIATE_RQ + 1, U32):
        cases.append((f"A-ASSOCIATE-RQ length {value}", False, _u32(rq, 2, value) + tail))
    for name, (offset, length) in _rq_length_fields(rq).items():
        for value in (0, 1, length + 1, U16):
            cases.append((f"RQ {name} item length {value}", False, _u16(rq, offset, value) + tail))
    max_length_value = _rq_length_fields(rq)["maximum length"][0] + 2
    for value in (0, 1, 7, U32):  # the peer's maximum PDU: our responses must still fit it
        cases.append(
            (f"RQ maximum length {value}", False, _u32(rq, max_length_value, value) + tail)
        )
    for pdu_type in (0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xFF):
        for value in (0, 1, 5, U32):
            body = b"\0" * min(value, 8)
            cases.append(
                (
                    f"PDU 0x{pdu_type:02X} length {value} first",
                    False,
                    pdu(pdu_type, body)[:2] + struct.pack(">I", value) + body,
                )
            )  # noqa: E501
    # --- inside an association
    echo = pdv(1, command(0x0030, 1, VERIFICATION), True, True)
    for value in (0, 1, MAX_PDU + 1, U32):
        cases.append(
            (
                f"P-DATA-TF length {value}",
                True,
                pdu(0x04, echo)[:2] + struct.pack(">I", value) + echo,
            )
        )
    for value in (0, 1, len(echo) - 4 + 1, U32):
        cases.append((f"PDV length {value}", True, pdu(0x04, _u32(echo, 0, value))))
    for pdu_type in (0x01, 0x02, 0x03, 0x05, 0x06, 0x07, 0x09):
        for value in (0, 1, 5, U32):
            body = b"\0" * min(value, 8)
            cases.append(
                (
                    f"PDU 0x{pdu_type:02X} length {value} in Sta6",
                    True,
                    pdu(pdu_type, body)[:2] + struct.pack(">I", value) + body,
                )
            )  # noqa: E501
    cmd = command(0x0030, 1, VERIFICATION)
    field_length = cmd.index(struct.pack("<HH", 0, 0x0100)) + 4
    for value in (0, 1, len(cmd) - field_length - 4 + 1, U32):
        bad = cmd[:field_length] + struct.pack("<I", value) + cmd[field_length + 4 :]
        cases.append(
            (f"command element length {value}", True, pdu(0x04, pdv(1, bad, True, True)) + tail)
        )
    fragment = pdv(1, b"\0" * 1024, True, False)
    count = limits.MAX_COMMAND_SET // 1024 + 1
    cases.append(
        ("command set over its bound", True, b"".join(pdu(0x04, fragment) for _ in range(count)))
    )
    cases.append(("data set without a command", True, pdu(0x04, pdv(3, b"\0" * 64, False, True))))
    cases.append(
        (
            "data set after a command without one",
            True,
            pdu(0x04, echo + pdv(1, b"\0" * 8, False, True)),
        )
    )
    data = dataset_bytes(sample)
    import pydicom

    sop = str(pydicom.dcmread(sample).SOPInstanceUID)
    pixel_length = data.index(b"\xe0\x7f\x10\x00") + 8
    store = pdv(3, command(0x0001, 2, CR_STORAGE, sop, data=True), True, True)
    for value in (0, 1, len(data) - pixel_length - 4 + 1, U32):
        bad = (
            _u32(data, pixel_length, 0)[:pixel_length]
            + struct.pack("<I", value)
            + data[pixel_length + 4 :]
        )
        cases.append(
            (
                f"pixel data length {value}",
                True,
                pdu(0x04, store) + pdu(0x04, pdv(3, bad, False, True)) + tail,
            )
        )
    cases.append(
        (
            "C-STORE of another SOP class",
            True,
            pdu(
                0x04,
                pdv(3, command(0x0001, 2, "1.2.840.10008.5.1.4.1.1.2", sop, data=True), True, True),
            )
            + pdu(0x04, pdv(3, data, False, True))
            + tail,
        )
    )  # noqa: E501
    return cases


def test_hand_built_pdus(server: Server) -> None:
    cases = hand_built_cases(server.sample)
    assert len(cases) > 100
    for name, inside, data in cases:
        exchange(server.port, data, associate=inside)
        check_after_case(server, name)


# ---------------------------------------------------------------------- recorded sessions
def record_session(server: Server, client: Callable[[int], None]) -> bytes:
    """What ``client(port)`` sends to the server, captured by a forwarding proxy."""
    listener = socket.create_server(("127.0.0.1", 0))
    captured = bytearray()

    def pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if keep is not None:
                    keep += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def proxy() -> None:
        conn, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", server.port))
        back = threading.Thread(target=pump, args=(upstream, conn, None))
        back.start()
        pump(conn, upstream, captured)
        back.join(10)
        conn.close()
        upstream.close()

    thread = threading.Thread(target=proxy)
    thread.start()
    client(listener.getsockname()[1])
    thread.join(20)
    listener.close()
    assert captured[:1] == b"\x01" and captured[-10:-4] == b"\x05\x00\x00\x00\x00\x04"
    return bytes(captured)


def _storescu_client(sample: Path) -> Callable[[int], None]:
    def run(port: int) -> None:
        proc = subprocess.run(
            [STORESCU, "-aec", "CXR_TRIAGE", "127.0.0.1", str(port), str(sample)],
            capture_output=True, text=True, timeout=30, env=dcmtk_env(), check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr

    return run


def _pynetdicom_client(sample: Path) -> Callable[[int], None]:
    def run(port: int) -> None:
        from pynetdicom import AE

        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(VERIFICATION)
        ae.add_requested_context(CR_STORAGE, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(sample).Status == 0
        assoc.release()

    return run


def header_offsets(stream: bytes) -> list[int]:
    """Offsets of every PDU, PDV and A-ASSOCIATE-RQ item length field in a recorded stream."""
    out: list[int] = []
    pos = 0
    while pos + 6 <= len(stream):
        pdu_type, length = stream[pos], struct.unpack_from(">I", stream, pos + 2)[0]
        out.append(pos + 2)
        if pdu_type == 0x01:
            out += [off for off, _len in _rq_length_fields(stream[pos : pos + 6 + length]).values()]
        elif pdu_type == 0x04:
            inner = pos + 6
            while inner + 6 <= pos + 6 + length:
                out.append(inner)
                inner += 4 + struct.unpack_from(">I", stream, inner)[0]
        pos += 6 + length
    return out


def mutate(stream: bytes, rng: random.Random, headers: list[int]) -> tuple[str, bytes]:
    """One seeded mutation: a length field set to a boundary, bit flips, a cut, a splice."""
    data = bytearray(stream)
    kind = rng.choice(["length", "length", "flip", "bytes", "cut", "splice", "repeat"])
    if kind == "length":
        at = rng.choice(headers)
        width = 4 if at + 4 <= len(data) and rng.random() < 0.7 else 2
        value = rng.choice(
            [0, 1, 2, 5, MAX_PDU + 1, (1 << (8 * width)) - 1, rng.getrandbits(8 * width)]
        )
        data[at : at + width] = value.to_bytes(width, "big")
        return f"length@{at}={value}", bytes(data)
    if kind == "flip":
        spots = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
        for at in spots:
            data[at] ^= 1 << rng.randrange(8)
        return f"flip@{spots}", bytes(data)
    if kind == "bytes":
        at = rng.choice(headers) + rng.randrange(-4, 8)
        at = min(max(at, 0), len(data) - 1)
        data[at] = rng.randrange(256)
        return f"byte@{at}", bytes(data)
    if kind == "cut":
        at = rng.randrange(len(data))
        return f"cut@{at}", bytes(data[:at])
    if kind == "splice":
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(1, 256))
        at = rng.randrange(len(data))
        return f"splice {start}:{end}@{at}", bytes(data[:at] + data[start:end] + data[at:])
    at = rng.randrange(len(data))
    return f"repeat@{at}", bytes(data[:at] + data[at:] * 2)


@pytest.mark.parametrize("client", ["storescu", "pynetdicom"])
def test_mutated_recorded_sessions(server: Server, client: str) -> None:
    make = _storescu_client if client == "storescu" else _pynetdicom_client
    stream = record_session(server, make(server.sample))
    check_after_case(server, f"recording the {client} session")
    exchange(server.port, stream)  # the recording replays as a valid session
    check_after_case(server, f"the {client} session replayed")
    rng = random.Random(f"{SEED}-{client}")
    headers = header_offsets(stream)
    for index in range(MUTATIONS_PER_SESSION):
        name, data = mutate(stream, rng, headers)
        exchange(server.port, data)
        check_after_case(server, f"{client} mutation {index}: {name}")


# ---------------------------------------------------------------------- floods
@contextlib.contextmanager
def connections(port: int, count: int, first_bytes: bytes = b"") -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if first_bytes:
                with contextlib.suppress(OSError):
                    sock.sendall(first_bytes)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (what it sent before, e.g. an A-ASSOCIATE-RJ, is
    read and dropped)."""
    sock.settimeout(0.01)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


@pytest.mark.parametrize(
    ("name", "count", "first_bytes"),
    [
        ("idle connections", 200, b""),
        ("half an A-ASSOCIATE-RQ each", 100, b"\x01\x00\x00\x00\x10\x00\x00\x01"),
        ("PDU headers announcing 4 GB", 100, b"\x01\x00\xff\xff\xff\xff"),
    ],
)
def test_flood_of_connections_that_never_associate(
    server: Server, name: str, count: int, first_bytes: bytes
) -> None:
    with connections(server.port, count, first_bytes) as socks:
        time.sleep(0.2)
        assert server.threads() <= server.baseline_threads + MAX_PENDING + MAX_ASSOCIATIONS + 2
        _store(server)  # a real peer associates while the flood holds its connections
        _echo(server.port)
        deadline = time.monotonic() + 2 * float(SETTINGS["artim_timeout"]) + 3
        while not all(_closed_by_server(s) for s in socks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_closed_by_server(s) for s in socks), "ARTIM did not close the flood"
    check_after_case(server, name)


def test_connect_and_close_churn(server: Server) -> None:
    for _ in range(150):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    check_after_case(server, "150 connections opened and closed")
