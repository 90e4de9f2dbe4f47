"""Helpers shared by the DICOM node tests and benchmarks: free ports, DCMTK peers, a real
``triage serve`` subprocess, synthetic plumbing datasets and raw C-STORE sends.

(Named ``test_node_*`` so it lives with the node tests; it has one self-test.)
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest

REPO = Path(__file__).resolve().parents[2]
TRIAGE = REPO / ".venv" / "bin" / "triage"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
DCIODVFY = "/usr/bin/dciodvfy"

#: DCMTK storescu flag that proposes each transfer syntax.
STORESCU_TS_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}

needs_dcmtk = pytest.mark.skipif(
    not (Path(STORESCU).exists() and Path(STORESCP).exists() and Path(ECHOSCU).exists()),
    reason="DCMTK tools (storescu, storescp, echoscu) are not installed in /usr/bin",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    aet: str = "STORESCU",
    aec: str = "CXR_TRIAGE",
    extra: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with DCMTK storescu, proposing the transfer syntax of the first file."""
    flag = STORESCU_TS_FLAG.get(transfer_syntax(files[0]), "")
    cmd = [STORESCU, "-aet", aet, "-aec", aec, "-nh", *([flag] if flag else []), *extra]
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), check=False
    )


def echo(port: int, aet: str = "ECHOSCU", timeout: float = 10.0) -> bool:
    try:
        proc = subprocess.run(
            [ECHOSCU, "-aet", aet, "-aec", "CXR_TRIAGE", "-to", "5", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.1)
    return False


_LAUNCHER = """
import sys
from dicom_node import cli
sys.exit(cli.main())
"""


@functools.lru_cache(maxsize=1)
def triage_command() -> tuple[str, ...]:
    """``.venv/bin/triage``, or (in a working tree without it, e.g. a git worktree) the same
    console script, :func:`dicom_node.cli.main`, run by this interpreter."""
    try:
        probe = subprocess.run(
            [str(TRIAGE), "--version"], capture_output=True, text=True, timeout=120, check=False
        )
    except OSError:  # no .venv in this working tree (a git worktree): this interpreter
        return (sys.executable, "-c", _LAUNCHER)
    if probe.returncode == 0:
        return (str(TRIAGE),)
    return (sys.executable, "-c", _LAUNCHER)


class ServeProcess:
    """A real ``triage serve`` (or ``triage worker``) subprocess; log in ``log_path``."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = list(args)
        self.log_path = log_path
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the subprocess lifetime
        self.proc = subprocess.Popen(
            [*triage_command(), *self.args], stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        log.close()
        return self

    def wait_ready(self, port: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"triage exited with {self.proc.returncode}:\n{self.log()}")
            if wait_port(port, 0.5) and echo(port):
                return
            time.sleep(0.2)
        raise AssertionError(f"triage not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def storescp_destination(out_dir: Path, port: int, aet: str = "PACS") -> Iterator[Path]:
    """A DCMTK storescp destination writing what it receives to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [STORESCP, "-aet", aet, "-od", str(out_dir), "--fork", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
        start_new_session=True,
    )
    try:
        assert wait_port(port, 10), "storescp did not start"
        yield out_dir
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def synthetic_cr(
    path: Path,
    *,
    study_uid: str | None = None,
    size: int = 128,
    seed: int = 0,
    body_part: str = "CHEST",
    view: str = "PA",
    accession: str = "ACC0001",
) -> Path:
    """Write a synthetic CR (plumbing only: random noise, no clinical content)."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size)) * 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1")
    sop_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.PatientName = "Synthetic^Plumbing"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a file, without preamble and file meta."""
    import io

    raw = path.read_bytes()
    fp = io.BytesIO(raw)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    return raw[fp.tell() :]


def send_raw(
    port: int,
    sop_class: str,
    sop_uid: str,
    transfer_syntax_uid: str,
    payload: bytes,
    tmp_dir: Path,
    aet: str = "RAWSCU",
) -> int | None:
    """C-STORE ``payload`` bytes exactly as given (no pydicom encoding); returns the status.

    The file meta is hand-written so that even a hostile SOP Instance UID goes on the wire.
    """
    from pydicom.config import settings
    from pynetdicom import AE, _config

    def element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        head = tag[0].to_bytes(2, "little") + tag[1].to_bytes(2, "little") + vr
        if vr == b"OB":
            return head + b"\x00\x00" + len(value).to_bytes(4, "little") + value
        return head + len(value).to_bytes(2, "little") + value

    body = b"".join(
        [
            element((0x0002, 0x0001), b"OB", b"\x00\x01"),
            element((0x0002, 0x0002), b"UI", sop_class.encode()),
            element((0x0002, 0x0003), b"UI", sop_uid.encode()),
            element((0x0002, 0x0010), b"UI", transfer_syntax_uid.encode()),
            element((0x0002, 0x0012), b"UI", b"1.2.3.4"),
        ]
    )
    meta = b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little") + body
    path = tmp_dir / f"raw-{time.monotonic_ns()}.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta + payload)
    ae = AE(ae_title=aet)
    ae.add_requested_context(sop_class, [transfer_syntax_uid])
    old_chunked = _config.STORE_SEND_CHUNKED_DATASET
    old_mode = settings.writing_validation_mode
    _config.STORE_SEND_CHUNKED_DATASET = True
    settings.writing_validation_mode = 1  # WARN: let the hostile UID reach the wire
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
        assert assoc.is_established, "association refused"
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old_chunked
        settings.writing_validation_mode = old_mode
    status = getattr(rsp, "Status", None)
    return None if status is None else int(status)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536
    assert sys.version_info >= (3, 11)
