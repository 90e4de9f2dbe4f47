"""The most memory one hostile connection can make ``triage serve`` use.

For each attack, a fresh ``triage serve --workers 0`` (ingest only) is started, warmed up
with a few real associations, and its peak resident memory (``VmHWM`` in ``/proc/PID/status``)
is read; then ONE connection carries the attack, and the peak is read again. The growth of the
peak is what that connection cost. The attacks aim at every bound of
``dicom_node.net.limits``: the largest A-ASSOCIATE-RQ of the worst shapes, the largest command
set, P-DATA at our maximum PDU length streaming a large data set, and the length fields that
used to allocate (an A-RELEASE-RQ announcing 4 GB). It prints one line per attack and the
largest growth, against the baseline measured first in the same run: the growth that one
ordinary association storing one 7.2 MB instance causes (DCMTK ``storescu``).

    .venv/bin/python benchmarks/bench_net_memory.py
    .venv/bin/python benchmarks/bench_net_memory.py --quick   # one attack per kind of bound
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench_ingest import make_instances
from ratios import print_ratio

from dicom_node.net import limits

ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"


# ---------------------------------------------------------------------- raw PDUs
def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(contexts: list[tuple[str, list[str]]], user_items: bytes = b"") -> bytes:
    body = struct.pack(">HH", 1, 0) + b"CXR_TRIAGE".ljust(16) + b"ATTACKER".ljust(16) + b"\0" * 32
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    for index, (abstract, syntaxes) in enumerate(contexts):
        value = bytes([2 * index + 1 & 0xFF, 0, 0, 0]) + item(0x30, abstract.encode())
        value += b"".join(item(0x40, ts.encode()) for ts in syntaxes)
        body += item(0x20, value)
    body += item(0x50, item(0x51, struct.pack(">I", 16384)) + user_items)
    return pdu(0x01, body)


def long_uid(n: int) -> str:
    """A valid 64-character UID, distinct per ``n``."""
    head = f"1.2.826.0.1.3680043.10.{n}."
    return head + "1" * (64 - len(head))


def fill_contexts(count: int, per_context: int) -> list[tuple[str, list[str]]]:
    return [(CR, [long_uid(i * per_context + k) for k in range(per_context)]) for i in range(count)]


def largest_rq(count: int) -> bytes:
    """``count`` contexts with as many 64-character transfer syntaxes as fit in the bound."""
    for per_context in range(limits.MAX_TRANSFER_SYNTAXES, 0, -1):
        rq = associate_rq(fill_contexts(count, per_context))
        if len(rq) - 6 <= limits.MAX_ASSOCIATE_RQ:
            return rq
    raise ValueError(count)


def command_set(elements: int) -> bytes:
    """A command set of ``elements`` distinct empty elements (a dict entry each)."""
    return b"".join(struct.pack("<HHI", 0, e, 0) for e in range(elements))


# ---------------------------------------------------------------------- one connection
def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = recv_exact(sock, 6)
    return head[0], recv_exact(sock, struct.unpack(">I", head[2:])[0])


def recv_exact(sock: socket.socket, count: int) -> bytes:
    out = bytearray()
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def associated(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(associate_rq([(VERIFICATION, ["1.2.840.10008.1.2"]), (CR, [EXPLICIT])]))
    assert read_pdu(sock)[0] == 0x02
    return sock


def finish(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    sock.close()


def send_and_finish(port: int, data: bytes, after_association: bool = False) -> None:
    sock = associated(port) if after_association else connect(port)
    with contextlib.suppress(OSError):
        sock.sendall(data)
    finish(sock)


def idle(port: int) -> None:
    sock = connect(port)
    time.sleep(2)
    sock.close()


def big_command(port: int) -> None:
    body = command_set(limits.MAX_COMMAND_SET // 8)
    chunks = [body[i : i + 8000] for i in range(0, len(body), 8000)]
    pdvs = [
        struct.pack(">IBB", len(c) + 2, 1, 0x01 | (0x02 if k == len(chunks) - 1 else 0)) + c
        for k, c in enumerate(chunks)
    ]
    send_and_finish(port, b"".join(pdu(0x04, p) for p in pdvs), after_association=True)


def streamed_dataset(port: int, megabytes: int = 64) -> None:
    """A C-STORE whose data set is ``megabytes`` MB of one OB element, sent at our maximum
    PDU length; the connection then closes (the instance is dropped)."""
    sock = associated(port)
    cmd = b"".join([
        struct.pack("<HHI", 0, 0x0002, 26) + CR.encode().ljust(26, b"\0"),
        struct.pack("<HHI", 0, 0x0100, 2) + struct.pack("<H", 1),
        struct.pack("<HHI", 0, 0x0110, 2) + struct.pack("<H", 1),
        struct.pack("<HHI", 0, 0x0700, 2) + struct.pack("<H", 0),
        struct.pack("<HHI", 0, 0x0800, 2) + struct.pack("<H", 0),
        struct.pack("<HHI", 0, 0x1000, 10) + b"1.2.3.4.5\0",
    ])  # fmt: skip
    cmd = struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(cmd)) + cmd
    sock.sendall(pdu(0x04, struct.pack(">IBB", len(cmd) + 2, 3, 0x03) + cmd))
    size = megabytes << 20
    head = struct.pack("<HH", 0x0009, 0x1010) + b"OB\0\0" + struct.pack("<I", size)
    fragment = (1 << 20) - 6 - 6
    data = head + b"\0" * (fragment - len(head))
    sent = 0
    with contextlib.suppress(OSError):
        while sent < size:
            sock.sendall(pdu(0x04, struct.pack(">IBB", len(data) + 2, 3, 0x00) + data))
            sent += len(data)
            data = b"\0" * fragment
    sock.close()


ATTACKS: dict[str, Callable[[int], None]] = {
    "idle connection (2 s)": idle,
    "A-ASSOCIATE-RQ announcing 2^32-1 bytes": lambda p: send_and_finish(
        p, struct.pack(">BBI", 1, 0, 0xFFFFFFFF) + b"\0" * 68
    ),
    "largest A-ASSOCIATE-RQ, 128 contexts of 64-char transfer syntaxes": lambda p: send_and_finish(
        p, largest_rq(limits.MAX_PRESENTATION_CONTEXTS)
    ),
    "largest A-ASSOCIATE-RQ, 30 contexts x 32 transfer syntaxes": lambda p: send_and_finish(
        p, largest_rq(30)
    ),
    "A-ASSOCIATE-RQ with 15,000 user-information sub-items": lambda p: send_and_finish(
        p, associate_rq([(CR, [EXPLICIT])], item(0x55, b"") * 15_000)
    ),
    "A-ASSOCIATE-RQ with 512 user-information sub-items (our bound)": lambda p: send_and_finish(
        p, associate_rq([(CR, [EXPLICIT])], item(0x55, b"") * 511)
    ),
    "largest command set (8,192 distinct elements)": big_command,
    "A-RELEASE-RQ announcing 2^32-1 bytes": lambda p: send_and_finish(
        p, struct.pack(">BBI", 5, 0, 0xFFFFFFFF) + b"\0" * 4, after_association=True
    ),
    "P-DATA-TF announcing 2^32-1 bytes": lambda p: send_and_finish(
        p, struct.pack(">BBI", 4, 0, 0xFFFFFFFF) + b"\0" * 64, after_association=True
    ),
    "64 MB data set in 1 MiB P-DATA-TF PDUs, then gone": streamed_dataset,
}


# ---------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key}")


def echo(port: int) -> bool:
    proc = subprocess.run(
        [ECHOSCU, "-aec", "CXR_TRIAGE", "-to", "2", "127.0.0.1", str(port)],
        capture_output=True, check=False,
    )  # fmt: skip
    return proc.returncode == 0


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    log = open(folder / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--port", str(port), "--bind-address",
         "127.0.0.1", "--storage", str(folder / "storage"), "--workers", "0", "--http-port", "0",
         "--stable-age", "86400"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TRIAGE_ARTIM_TIMEOUT": "5"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not echo(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"triage serve did not start: see {folder / 'serve.log'}")
            time.sleep(0.2)
        yield port, proc.pid
        if proc.poll() is not None:
            raise RuntimeError("triage serve died")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def measure(name: str, attack: Callable[[int], None]) -> tuple[int, int]:
    """``(growth of the peak RSS, largest RSS seen during the attack minus RSS before)``.

    The first misses what the warm-up's own peak already covered (e.g. an association's read
    buffer, freed since); the second, sampled every 5 ms, catches it."""
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as (port, pid):
        for _ in range(3):  # warm up: imports, negotiation cache, allocator arenas
            send_and_finish(port, pdu(0x05, b"\0" * 4), after_association=True)
            echo(port)
        time.sleep(0.5)
        peak_before, rss_before = status(pid, "VmHWM"), status(pid, "VmRSS")
        highest = [rss_before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                highest[0] = max(highest[0], status(pid, "VmRSS"))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            attack(port)
            time.sleep(0.5)
        finally:
            done.set()
            sampler.join()
        assert echo(port), f"{name}: the node stopped answering"
        return status(pid, "VmHWM") - peak_before, highest[0] - rss_before


#: The attacks of ``--quick``: one per kind of bound (a length field, the association request,
#: the command set, the data set stream).
QUICK = (
    "A-ASSOCIATE-RQ announcing 2^32-1 bytes",
    "largest A-ASSOCIATE-RQ, 128 contexts of 64-char transfer syntaxes",
    "largest command set (8,192 distinct elements)",
    "64 MB data set in 1 MiB P-DATA-TF PDUs, then gone",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} attacks, not all")
    args = parser.parse_args(argv)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "?",
    )  # fmt: skip
    print(f"peak RSS growth of triage serve caused by one hostile connection ({cpu})")
    with tempfile.TemporaryDirectory() as tmp:
        (large,) = make_instances(Path(tmp), 1, 1900, 1900)
        size = large.stat().st_size / 1e6
        base_peak, base_during = measure("baseline", lambda port: store(port, large))
    baseline = max(base_peak, base_during)
    print(f"baseline: one ordinary association storing one {size:.1f} MB instance: "
          f"{baseline / 2**20:.2f} MiB")  # fmt: skip
    print("  peak growth | RSS during - before | attack")
    worst = 0
    attacks = {k: v for k, v in ATTACKS.items() if not args.quick or k in QUICK}
    for name, attack in attacks.items():
        peak, during = measure(name, attack)
        worst = max(worst, peak, during)
        print(f"  {peak / 2**20:8.2f} MiB | {during / 2**20:8.2f} MiB | {name}", flush=True)
    print(f"largest: {worst / 2**20:.2f} MiB")
    print_ratio(
        f"net memory, worst hostile connection / ordinary {size:.1f} MB C-STORE association, "
        "RSS growth (lower is better)",
        float(worst),
        float(baseline),
        target=2.0,
        lower=True,
    )
    return 0


def store(port: int, path: Path) -> None:
    """One ordinary association: DCMTK ``storescu`` stores ``path``."""
    subprocess.run(
        [STORESCU, "-aec", "CXR_TRIAGE", "127.0.0.1", str(port), str(path)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
