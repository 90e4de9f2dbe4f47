"""C-STORE ingest throughput: ``triage serve`` against DCMTK ``storescp`` and Orthanc, same run.

DCMTK ``storescu`` (``TCP_NODELAY=1`` in its environment, and in the receivers' that link DCMTK)
sends the same N synthetic plumbing instances (distinct SOP Instance UIDs, noise pixels) in one
association to

* DCMTK ``storescp`` writing each file to disk (page cache: it never fsyncs),
* Orthanc (``/usr/sbin/Orthanc``, Debian's 1.10, when installed), a durable PACS: its own
  storage area and SQLite index, ``SyncStorageArea`` at its default ``true`` (each file
  fsynced before the C-STORE response), maximum PDU 128 KiB like the others; where it is not
  installed its column says so,
* ``triage serve --workers 0`` (ingest only), durable: success is answered once the instance
  is on stable storage (the spool file fsynced and renamed, its folder fsynced, its row
  committed: docs/durability.md), and
* the same ``triage serve`` with ``TRIAGE_SPOOL_FSYNC=false``, which gives storescp's guarantee
  (page cache only): the difference between the two is the price of durability on this disk,

for small (~40 KB) and CR-sized (~7 MB) instances, then the same with 4 parallel associations
(4 storescu processes, N/4 files each). The servers run interleaved, ``--repeat`` times each,
and the best rate of each is kept (timings on a shared 2-core machine are noisy). It prints
instances/s, then a table of the ratios ours / storescp and ours / Orthanc for the four cases.

STOW-RS rows: the same 100 small instances (30 large) into ``triage serve`` (durable) by
C-STORE (one ``storescu`` association) and by STOW-RS (``POST /dicomweb/studies``, one
``http.client`` keep-alive connection: one request per instance, then one request for all; then
4 such clients at once, one request per instance), and into Orthanc's
DICOMweb plugin (Debian's ``orthanc-dicomweb``, durable) by STOW-RS both ways; ratios
STOW/C-STORE (target 0.8) and ours/Orthanc (target 1.0). ``--stow-only`` runs just these.

    .venv/bin/python benchmarks/bench_ingest.py            # 200 instances per case, 3 repeats
    .venv/bin/python benchmarks/bench_ingest.py --quick    # 60 small, 30 large, 1 repeat
    .venv/bin/python benchmarks/bench_ingest.py --stow-only --repeat 3   # the STOW-RS rows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from ratios import print_ratio

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
STOW_COUNT = 100  # instances per STOW-RS case
AE_TITLE = "CXR_TRIAGE"
MAX_PDU = 131072  # the largest Orthanc accepts; storescp, storescu and triage serve get the same


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_echo(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(
            [ECHOSCU, "-aec", AE_TITLE, "-to", "2", "127.0.0.1", str(port)],
            capture_output=True, check=False, env=dcmtk_env(),
        )  # fmt: skip
        if proc.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers C-ECHO on port {port}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def serve_command() -> list[str]:
    """``triage serve`` run by this interpreter (the project's venv when run as documented)."""
    return [sys.executable, "-m", "dicom_node", "serve"]


def write_synthetic_cr(
    path: Path,
    pixels: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    accession: str,
    instance_number: int,
) -> Path:
    """One synthetic 12-bit CR chest PA file (plumbing only, never a clinical image)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "Bench^Plumbing", patient_id
    ds.AccessionNumber, ds.StudyID, ds.SeriesNumber = accession, "1", 1
    ds.InstanceNumber = instance_number
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def make_instances(folder: Path, count: int, rows: int, cols: int) -> list[Path]:
    """Synthetic CR files (noise; plumbing only) with distinct UIDs, in 4 studies."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(0).random((rows, cols)) * 4095).astype(np.uint16)
    studies = [generate_uid() for _ in range(4)]
    series = [generate_uid() for _ in range(4)]
    return [
        write_synthetic_cr(
            folder / f"{i:05d}.dcm",
            pixels,
            study_uid=studies[i % 4],
            series_uid=series[i % 4],
            patient_id="BENCH",
            accession=f"B{i % 4:04d}",
            instance_number=i + 1,
        )
        for i in range(count)
    ]


def send(port: int, files: Sequence[Path], parallel: int) -> float:
    """Seconds for ``parallel`` storescu processes to send ``files`` (one association each)."""
    chunks = [list(files[i::parallel]) for i in range(parallel)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                STORESCU,
                "-aet",
                "BENCH",
                "-aec",
                AE_TITLE,
                "-xe",
                "--max-pdu",
                str(MAX_PDU),
                "127.0.0.1",
                str(port),
                *map(str, chunk),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dcmtk_env(),
        )  # fmt: skip
        for chunk in chunks
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - started
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-2000:]}")
    return elapsed


@contextlib.contextmanager
def dcmtk_storescp(out: Path, port: int) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [STORESCP, "-aet", AE_TITLE, "-od", str(out), "--fork", "--max-pdu", str(MAX_PDU),
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_echo(port)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


@contextlib.contextmanager
def triage_serve(
    storage: Path,
    port: int,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    http_port: int = 0,
) -> Iterator[subprocess.Popen[bytes]]:
    cmd = serve_command()
    log = open(storage.parent / f"serve-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--bind-address", "127.0.0.1", "--storage", str(storage),
         "--workers", "0", "--http-port", str(http_port), "--stable-age", "86400", *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        wait_echo(port)
        if http_port:
            wait_http(f"http://127.0.0.1:{http_port}/healthz")
        yield proc
    finally:
        stop_process(proc, 30)
        log.close()


def orthanc_config(folder: Path, port: int, http_port: int, dicomweb: bool = False) -> Path:
    """Write ``folder/config.json`` for Orthanc on ``folder``'s storage area and index (made if
    missing: a second start is a warm one), local REST only, the DICOMweb plugin (Debian's
    ``orthanc-dicomweb``, root ``/dicom-web/``) when ``dicomweb``, otherwise no plugins.

    ``SyncStorageArea`` is written out at its default (``true`` since Orthanc 1.7.4): each
    file of the storage area is fsynced before the C-STORE is answered."""
    storage, index = folder / "storage", folder / "index"
    storage.mkdir(parents=True, exist_ok=True)
    index.mkdir(exist_ok=True)
    plugins = [str(DICOMWEB_PLUGIN)] if dicomweb else []
    config = {
        "Name": "bench",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(index),
        "HttpPort": http_port,
        "DicomPort": port,
        "DicomAet": AE_TITLE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SyncStorageArea": True,
        "MaximumPduLength": MAX_PDU,
        "Plugins": plugins,
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


@contextlib.contextmanager
def orthanc(folder: Path, port: int, http_port: int | None = None) -> Iterator[Callable[[], int]]:
    """Orthanc run by hand on a fresh storage area and index (:func:`orthanc_config`; with
    ``http_port`` its DICOMweb plugin is loaded). Orthanc links DCMTK, which reads
    ``TCP_NODELAY`` from the environment. Yields a function that asks Orthanc's REST API how
    many instances it holds."""
    dicomweb = http_port is not None
    http_port = http_port or free_port()
    orthanc_config(folder, port, http_port, dicomweb)
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(ORTHANC), str(folder / "config.json")],
        stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(),
    )  # fmt: skip

    def instances() -> int:
        url = f"http://127.0.0.1:{http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            return int(json.load(reply)["CountInstances"])

    try:
        wait_echo(port)
        yield instances
    finally:
        stop_process(proc, 60)
        log.close()


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answers {url}")


# ---------------------------------------------------------------------- STOW-RS
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=bench-boundary'


def stow_body(files: Sequence[bytes]) -> bytes:
    head = b"--bench-boundary\r\nContent-Type: application/dicom\r\n\r\n"
    return b"".join(head + data + b"\r\n" for data in files) + b"--bench-boundary--\r\n"


def stow(url: str, files: Sequence[bytes], per_instance: bool) -> float:
    """Seconds to store ``files`` at ``url`` (``.../studies``) by STOW-RS, one keep-alive
    connection: one request per instance, or one request for all.

    The client is the standard library's ``http.client`` (the body goes out in one
    ``sendall``): httpx, measured here, sent one 216 MB body at a quarter of the rate the same
    server took from a plain socket (10-12 against 42-44 instances/s), so it timed itself."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    bodies = [stow_body([f]) for f in files] if per_instance else [stow_body(files)]
    headers = {"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        started = time.perf_counter()
        for body in bodies:
            conn.request("POST", parts.path, body=body, headers=headers)
            rsp = conn.getresponse()
            text = rsp.read()
            if rsp.status != 200:
                raise RuntimeError(f"STOW-RS to {url}: HTTP {rsp.status} {text[:300]!r}")
        return time.perf_counter() - started
    finally:
        conn.close()


def stow_parallel(url: str, files: Sequence[bytes], clients: int) -> float:
    """Seconds to store ``files`` by ``clients`` concurrent STOW-RS clients (threads, one
    keep-alive connection each, one request per instance, ``files`` split evenly)."""
    from concurrent.futures import ThreadPoolExecutor

    shares = [files[i::clients] for i in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda share: stow(url, share, True), shares))
    return time.perf_counter() - started


STOW_RECEIVERS = ("cstore", "stow1", "stowall", "stow4", "orthanc1", "orthanc_all")


def run_stow_case(
    label: str, files: Sequence[Path], work: Path, repeat: int
) -> dict[str, float | None]:
    """The same instances into ``triage serve`` (durable) by C-STORE (storescu, one
    association) and by STOW-RS (one request per instance, one request for all), and into
    Orthanc's DICOMweb plugin by STOW-RS (durable: SyncStorageArea) both ways; best of
    ``repeat`` interleaved runs, instances/s."""
    n = len(files)
    data = [p.read_bytes() for p in files]
    has_orthanc = ORTHANC.exists() and DICOMWEB_PLUGIN.exists()
    best: dict[str, float | None] = dict.fromkeys(STOW_RECEIVERS, 0.0)
    if not has_orthanc:
        best["orthanc1"] = best["orthanc_all"] = None

    def keep(name: str, rate: float) -> None:
        best[name] = max(best[name] or 0.0, rate)

    for attempt in range(repeat):
        for name in ("cstore", "stow1", "stowall", "stow4"):
            storage = work / f"stow-{label}-{name}-{attempt}"
            storage.mkdir()
            port, http_port = free_port(), free_port()
            with triage_serve(storage, port, http_port=http_port):
                url = f"http://127.0.0.1:{http_port}/dicomweb/studies"
                if name == "cstore":
                    keep(name, n / send(port, files, 1))
                elif name == "stow4":
                    keep(name, n / stow_parallel(url, data, 4))
                else:
                    keep(name, n / stow(url, data, name == "stow1"))
            stored = count_files(storage / "spool")
            assert stored == n, f"triage stored {stored} of {n} ({name})"
            shutil.rmtree(storage)
        if has_orthanc:
            for name, how in (("orthanc1", True), ("orthanc_all", False)):
                folder = work / f"stow-orthanc-{label}-{name}-{attempt}"
                http_port = free_port()
                with orthanc(folder, free_port(), http_port) as instances:
                    url = f"http://127.0.0.1:{http_port}/dicom-web/studies"
                    keep(name, n / stow(url, data, how))
                    stored = instances()
                assert stored == n, f"Orthanc stored {stored} of {n} ({name})"
                shutil.rmtree(folder)
    return best


def print_stow(rows: Sequence[tuple[str, int, dict[str, float | None]]]) -> None:
    print(
        "\nSTOW-RS   | C-STORE/s | STOW 1/req/s | STOW all/s | Orthanc 1/req/s | Orthanc all/s"
        " | STOW1/C-STORE | STOWall/C-STORE | STOW1/Orthanc | STOWall/Orthanc"
    )
    for label, n, r in rows:
        print(
            f"{label:>6} x{n:<3}| {r['cstore'] or 0:9.1f} | {r['stow1'] or 0:12.1f} | "
            f"{r['stowall'] or 0:10.1f} | {rate_text(r['orthanc1']):>15} | "
            f"{rate_text(r['orthanc_all']):>13} | {ratio_text(r['stow1'], r['cstore']):>13} | "
            f"{ratio_text(r['stowall'], r['cstore']):>15} | "
            f"{ratio_text(r['stow1'], r['orthanc1']):>13} | "
            f"{ratio_text(r['stowall'], r['orthanc_all']):>15}"
        )
    for label, n, r in rows:
        case = f"ingest STOW-RS {label} x{n}"
        print_ratio(f"{case}, 1 instance/request / C-STORE", r["stow1"], r["cstore"], target=0.8)
        print_ratio(f"{case}, all in 1 request / C-STORE", r["stowall"], r["cstore"], target=1.0)
        print_ratio(
            f"{case}, 1 instance/request / Orthanc's",
            r["stow1"],
            r["orthanc1"],
            target=1.5,
            why_missing=ORTHANC_MISSING,
        )
        print_ratio(
            f"{case}, all in 1 request / Orthanc's",
            r["stowall"],
            r["orthanc_all"],
            target=1.5,
            why_missing=ORTHANC_MISSING,
        )
        print_ratio(f"{case}, 4 clients / 1 client", r["stow4"], r["stow1"], target=1.6)


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


RECEIVERS = ("storescp", "triage", "unsynced", "orthanc")
#: Issue 25's C-STORE targets, triage / Orthanc, by (instance size, associations).
CSTORE_TARGETS = {("small", 1): 1.5, ("large", 1): 2.0}
ORTHANC_MISSING = f"{ORTHANC} or its DICOMweb plugin not installed"
#: Issue 25: the peak while 4 associations store large instances stays under idle + this.
PEAK_BUDGET_MB = 150.0


def memory_mb(pid: int, key: str) -> float:
    """``VmRSS`` or ``VmHWM`` (the peak) of ``pid`` in MB, from ``/proc/PID/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for process {pid}")


def run_case(
    label: str, files: Sequence[Path], work: Path, parallel: int, repeat: int
) -> dict[str, float | None]:
    """Best of ``repeat`` interleaved runs each: storescp, triage serve (durable), triage serve
    with ``spool_fsync`` off (storescp's guarantee: page cache only), and Orthanc (durable) when
    installed. Returns the rates in instances/s by receiver, ``None`` for Orthanc when absent."""
    best: dict[str, float | None] = dict.fromkeys(RECEIVERS, 0.0)
    if not ORTHANC.exists():
        best["orthanc"] = None
    n = len(files)
    peaks: list[tuple[float, float]] = []  # (RSS before sending, peak), durable triage serve

    def keep(name: str, rate: float) -> None:
        best[name] = max(best[name] or 0.0, rate)

    for attempt in range(repeat):
        tag = f"{label}-{parallel}-{attempt}"
        ref_out = work / f"storescp-{tag}"
        port = free_port()
        with dcmtk_storescp(ref_out, port):
            keep("storescp", n / send(port, files, parallel))
        assert count_files(ref_out) == n, "storescp lost files"
        shutil.rmtree(ref_out)
        for name, fsync in (("triage", "true"), ("unsynced", "false")):
            storage = work / f"triage-{tag}-{fsync}"
            storage.mkdir()
            port = free_port()
            with triage_serve(storage, port, env={"TRIAGE_SPOOL_FSYNC": fsync}) as proc:
                idle = memory_mb(proc.pid, "VmRSS")
                keep(name, n / send(port, files, parallel))
                peak = memory_mb(proc.pid, "VmHWM")
            if name == "triage":
                peaks.append((idle, peak))
            stored = count_files(storage / "spool")
            assert stored == n, f"triage stored {stored} of {n}"
            shutil.rmtree(storage)
        if best["orthanc"] is not None:
            folder = work / f"orthanc-{tag}"
            port = free_port()
            with orthanc(folder, port) as instances:
                keep("orthanc", n / send(port, files, parallel))
                stored = instances()
            assert stored == n, f"Orthanc stored {stored} of {n}"
            shutil.rmtree(folder)
    print(
        f"{label:>6} x{n:<4} {parallel} assoc | storescp {best['storescp']:8.1f}/s | triage "
        f"serve {best['triage']:8.1f}/s | without fsync {best['unsynced']:8.1f}/s | Orthanc "
        f"{rate_text(best['orthanc'])}",
        flush=True,
    )
    idle, peak = max(peaks, key=lambda pair: pair[1] - pair[0])
    print(
        f"{label:>6} x{n:<4} {parallel} assoc | triage serve RSS {idle:.0f} MB before, peak "
        f"{peak:.0f} MB (+{peak - idle:.0f} MB; budget +{PEAK_BUDGET_MB:.0f} MB: "
        f"{'met' if peak - idle <= PEAK_BUDGET_MB else 'missed'})",
        flush=True,
    )
    return best


def rate_text(rate: float | None) -> str:
    return "not installed" if rate is None else f"{rate:8.1f}/s"


def ratio_text(ours: float | None, ref: float | None) -> str:
    return "  n/a" if ours is None or not ref else f"{ours / ref:5.2f}"


def print_ratios(rows: Sequence[tuple[str, int, dict[str, float | None]]]) -> None:
    """The summary: ours / storescp and ours / Orthanc, durable and without fsync."""
    print(
        "\ncase              | triage/storescp | triage/Orthanc | no-fsync/storescp"
        " | no-fsync/Orthanc"
    )
    for label, parallel, rates in rows:
        ours, unsynced = rates["triage"], rates["unsynced"]
        print(
            f"{label:>6} {parallel} assoc{'':5}| {ratio_text(ours, rates['storescp']):>15} | "
            f"{ratio_text(ours, rates['orthanc']):>14} | "
            f"{ratio_text(unsynced, rates['storescp']):>17} | "
            f"{ratio_text(unsynced, rates['orthanc']):>16}"
        )
    if not ORTHANC.exists():
        print(f"Orthanc: {ORTHANC} not installed (apt-get install -y orthanc), its columns are n/a")
    by_case = {(label, parallel): rates for label, parallel, rates in rows}
    for (label, parallel), rates in by_case.items():
        case = f"ingest C-STORE {label} {parallel} assoc"
        print_ratio(
            f"{case}, triage / Orthanc",
            rates["triage"],
            rates["orthanc"],
            target=CSTORE_TARGETS.get((label, parallel)),
            why_missing=ORTHANC_MISSING,
        )
        print_ratio(f"{case}, triage / storescp (which never fsyncs)", rates["triage"],
                    rates["storescp"])  # fmt: skip
        one = by_case.get((label, 1))
        if parallel > 1 and one is not None:
            print_ratio(
                f"ingest C-STORE {label}, triage {parallel} assoc / 1 assoc",
                rates["triage"],
                one["triage"],
                target=1.5,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances")
    parser.add_argument(
        "--stow-only",
        action="store_true",
        help="only the STOW-RS rows (and their C-STORE baseline)",
    )
    parser.add_argument("--count", type=int, help="instances per case (default 200)")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temp folder)")
    parser.add_argument(
        "--repeat", type=int, help="interleaved runs per server, best kept (default 3, quick 1)"
    )
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    small_n = args.count or (60 if args.quick else 200)
    large_n = args.count or (30 if args.quick else 200)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        if args.stow_only:
            small_n, large_n = STOW_COUNT if not args.quick else 30, 30
            small_n = args.count or small_n
        small = make_instances(work / "small", small_n, 140, 140)
        large = make_instances(work / "large", large_n, 1900, 1900)
        print(
            f"small {small[0].stat().st_size / 1e3:.0f} KB, large "
            f"{large[0].stat().st_size / 1e6:.1f} MB; best of {repeat} interleaved run(s) per "
            f"server; Orthanc {'at ' + str(ORTHANC) if ORTHANC.exists() else 'not installed'}"
        )
        if not args.stow_only:
            rows = []
            for parallel in (1, 4):
                for label, files in (("small", small), ("large", large)):
                    rows.append((label, parallel, run_case(label, files, work, parallel, repeat)))
            print_ratios(rows)
        # STOW-RS: the same instances by STOW-RS and by C-STORE, and into Orthanc's DICOMweb
        stow_n = args.count or (30 if args.quick else STOW_COUNT)
        stow_rows = [
            (
                "small",
                min(stow_n, len(small)),
                run_stow_case("small", small[:stow_n], work, repeat),
            ),
            ("large", min(30, len(large)), run_stow_case("large", large[:30], work, repeat)),
        ]
        print_stow(stow_rows)
        if args.stow_only:
            return 0
        # what TCP_NODELAY buys: the same small files with Nagle left on by triage serve
        rates = []
        for nodelay in ("true", "false"):
            storage = work / f"nagle-{nodelay}"
            storage.mkdir()
            port = free_port()
            with triage_serve(storage, port, env={"TRIAGE_TCP_NODELAY": nodelay}):
                rates.append(len(small) / send(port, small, 1))
            shutil.rmtree(storage)
        print(
            f"TCP_NODELAY check, small x{len(small)} 1 assoc: triage serve with TCP_NODELAY "
            f"{rates[0]:.1f}/s, with Nagle {rates[1]:.1f}/s ({rates[0] / rates[1]:.1f}x)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
