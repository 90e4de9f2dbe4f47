"""Hostile STOW-RS bodies against a running node (seeded, bounded, well under a minute).

Missing boundary, wrong content types, parts over the part limit, bodies over the body limit
(with and without Content-Length), endless and overlong part headers, too many parts, a part
that is not DICOM, a truncated data set, a body without its closing delimiter, a client that
goes away mid-part, and seeded random mutations of a valid body. After every case: a clear 4xx
(never a 5xx), nothing left in ``spool/.incoming``, nothing in the spool that was not
acknowledged, and the node still stores a valid instance. A 96 MiB part streams through with
the process's peak memory growing by far less than the part.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_support import STOW_TYPE, RunningNode, multipart_body, running_node
from test_node_support import synthetic_cr

MAX_PART = 4 << 20
MAX_BODY = 16 << 20
MAX_PARTS = 8
SEED = 20261203


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(
        tmp_path_factory.mktemp("dicomweb-fuzz"),
        dicomweb_max_part=MAX_PART,
        dicomweb_max_body=MAX_BODY,
        dicomweb_max_parts=MAX_PARTS,
        network_timeout=2,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return synthetic_cr(tmp_path_factory.mktemp("valid") / "v.dcm", size=64).read_bytes()


def post(
    node: RunningNode, body: object, content_type: str = STOW_TYPE, **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{node.base}/studies",
        content=body,  # type: ignore[arg-type]
        headers={"Content-Type": content_type, **headers},
        timeout=120,
    )


def check_clean(node: RunningNode, spooled_before: set[Path], stored: int = 0) -> None:
    """Nothing half-written; only acknowledged instances were added."""
    deadline = time.monotonic() + 5
    while node.incoming() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.incoming() == []
    assert len(set(node.spool_files()) - spooled_before) == stored


def fresh(tmp_path: Path, seed: int) -> bytes:
    return synthetic_cr(tmp_path / f"f{seed}.dcm", size=64, seed=seed).read_bytes()


def still_stores(node: RunningNode, tmp_path: Path) -> None:
    rsp = post(node, multipart_body([("application/dicom", fresh(tmp_path, 999_999))]))
    assert rsp.status_code == 200, rsp.text


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ('multipart/related; type="application/dicom"', 415),  # no boundary
        ("application/dicom", 415),
        ("application/json", 415),
        ("multipart/form-data; boundary=b0undary", 415),
        ('multipart/related; type="application/dicom+json"; boundary=b0undary', 415),
        ("", 415),
        ('multipart/related; type="application/dicom"; boundary=' + "x" * 201, 415),
    ],
)
def test_content_types_refused(
    node: RunningNode, valid: bytes, content_type: str, status: int
) -> None:
    before = set(node.spool_files())
    rsp = post(node, multipart_body([("application/dicom", valid)]), content_type)
    assert rsp.status_code == status
    assert "multipart/related" in rsp.json()["detail"]
    check_clean(node, before)


def test_limits(node: RunningNode, tmp_path: Path) -> None:
    before = set(node.spool_files())
    big = b"\x00" * 128 + b"DICM" + b"\x00" * (MAX_PART + 1)
    rsp = post(node, multipart_body([("application/dicom", big)]))
    assert rsp.status_code == 413 and "segment size" in rsp.json()["detail"]
    check_clean(node, before)
    # over the body limit, announced: refused before reading the body
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", node.settings.http_port), timeout=10) as sock:
        sock.sendall(head + b"--b0undary\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")

    # over the body limit, chunked (no Content-Length): refused while reading
    def endless() -> Iterator[bytes]:
        yield b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(MAX_BODY // (1 << 20) + 2):
            yield b"\x01" * (1 << 20)

    rsp = post(node, endless())
    assert rsp.status_code == 413
    check_clean(node, before)
    parts = [("application/dicom", fresh(tmp_path, i)) for i in range(MAX_PARTS + 2)]
    rsp = post(node, multipart_body(parts))
    assert rsp.status_code == 413 and "segment count" in rsp.json()["detail"]
    assert f"{MAX_PARTS} instance(s) before it were stored" in rsp.json()["detail"]
    check_clean(node, before, stored=MAX_PARTS)
    still_stores(node, tmp_path)


def test_endless_and_overlong_headers(node: RunningNode, valid: bytes) -> None:
    before = set(node.spool_files())
    many = "".join(f"X-Filler-{i}: y\r\n" for i in range(10_000))
    body = f"--b0undary\r\n{many}\r\n".encode() + valid + b"\r\n--b0undary--\r\n"
    rsp = post(node, body)
    assert rsp.status_code == 413 and "header count" in rsp.json()["detail"]
    body = (
        f"--b0undary\r\nX-Long: {'z' * 100_000}\r\n\r\n".encode() + valid + b"\r\n--b0undary--\r\n"
    )
    rsp = post(node, body)
    assert rsp.status_code == 413 and "header length" in rsp.json()["detail"]
    rsp = post(node, b"--b0undary\r\nContent-Type: application/dicom\n\n" + valid)
    assert rsp.status_code == 400
    check_clean(node, before)


def test_parts_that_are_not_usable(node: RunningNode, valid: bytes) -> None:
    before = set(node.spool_files())
    quarantined = len(node.quarantined())
    cases = [
        ("application/dicom", b"not DICOM at all, just text"),
        ("application/dicom", b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff"),
        ("application/octet-stream", valid),
        ("application/dicom", valid[:132]),  # preamble only
    ]
    rsp = post(node, multipart_body(cases))
    assert rsp.status_code == 409
    failed = pydicom.Dataset.from_json(rsp.json()).FailedSOPSequence
    assert [f.FailureReason for f in failed] == [0xC000] * len(cases)
    assert len(node.quarantined()) == quarantined  # nothing was DICOM enough to keep
    # a data set cut inside its pixel data: refused, quarantined (as a C-STORE would be)
    rsp = post(node, multipart_body([("application/dicom", valid[: len(valid) - 1000])]))
    assert rsp.status_code == 409
    (failed_item,) = pydicom.Dataset.from_json(rsp.json()).FailedSOPSequence
    assert failed_item.FailureReason == 0xC000
    assert (
        failed_item.ReferencedSOPInstanceUID
        == pydicom.dcmread(__import__("io").BytesIO(valid)).SOPInstanceUID
    )
    assert len(node.quarantined()) == quarantined + 1
    check_clean(node, before)


def test_body_without_closing_delimiter_keeps_nothing_of_its_part(
    node: RunningNode, tmp_path: Path
) -> None:
    before = set(node.spool_files())
    body = multipart_body([("application/dicom", fresh(tmp_path, 7))])
    rsp = post(node, body[: -len(b"\r\n--b0undary--\r\n")])
    assert rsp.status_code == 400
    check_clean(node, before)


def test_client_gone_mid_part(node: RunningNode, tmp_path: Path) -> None:
    before = set(node.spool_files())
    data = fresh(tmp_path, 8)
    body = multipart_body([("application/dicom", data)])
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for cut in (len(body) // 2, len(body) - 40):
        with socket.create_connection(("127.0.0.1", node.settings.http_port), timeout=10) as sock:
            sock.sendall(head + body[:cut])
            time.sleep(0.3)
        check_clean(node, before)
    # silent client: ends after network_timeout with nothing kept
    with socket.create_connection(("127.0.0.1", node.settings.http_port), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        sock.settimeout(10)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400")
    check_clean(node, before)
    still_stores(node, tmp_path)


def test_random_mutations(node: RunningNode, valid: bytes, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    body = multipart_body([("application/dicom", valid), ("application/dicom", fresh(tmp_path, 9))])
    for case in range(40):
        mutated = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(mutated))
            mutated[pos] = rng.randrange(256)
        if rng.random() < 0.3:
            mutated = mutated[: rng.randrange(len(mutated))]
        before = set(node.spool_files())
        rsp = post(node, bytes(mutated))
        assert rsp.status_code in (200, 202, 400, 409, 413), (case, rsp.status_code, rsp.text)
        stored = 0
        if rsp.status_code in (200, 202):
            answer = pydicom.Dataset.from_json(rsp.json())
            referenced = {
                str(i.ReferencedSOPInstanceUID) for i in answer.get("ReferencedSOPSequence", [])
            }
            stored = len({p for p in node.spool_files() if p.stem in referenced} - before)
        check_clean(node, before, stored)
    still_stores(node, tmp_path)


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+), so the peaks of earlier tests in
    this process do not count."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_large_part_streams_with_bounded_memory(tmp_path: Path) -> None:
    size = 96 << 20
    meta_uid = pydicom.uid.generate_uid()
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66"  # Raw Data: no pixel data needed
    ds.SOPInstanceUID = meta_uid
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "OT"
    import io

    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = meta_uid
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    # a private OB element of 96 MiB after the header, sent in 1 MiB chunks
    element = struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, size)
    creator = struct.pack("<HH2sH", 0x0029, 0x0010, b"LO", 4) + b"TEST"

    def body() -> Iterator[bytes]:
        yield (
            b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
            + out.getvalue()
            + creator
            + element
        )
        for _ in range(size >> 20):
            yield b"\x5a" * (1 << 20)
        yield b"\r\n--b0undary--\r\n"

    with running_node(tmp_path / "big", spool_fsync=False) as big:
        _reset_peak_rss()
        rss_before = _current_rss()
        rsp = post(big, body())
        assert rsp.status_code == 200, rsp.text
        growth = _peak_rss() - rss_before
        (kept,) = big.spool_files()
        assert kept.stat().st_size > size
    assert growth < 48 << 20, f"peak memory grew by {growth >> 20} MiB for a 96 MiB part"
