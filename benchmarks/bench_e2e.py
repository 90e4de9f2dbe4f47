"""End-to-end latency and worker throughput of ``triage serve`` (EfficientNet-B0, CPU).

1. **Latency**: 20 studies (2 synthetic 1024 px CR images each; plumbing only) are sent one after
   the other with DCMTK ``storescu``; for each, the time from the last C-STORE response to the
   SR arriving at the destination (DCMTK ``storescp`` in its own process, as a PACS would be),
   minus ``--stable-age``. p50 and p95 are printed (target p95 < 0.5 s on the 2-core machine,
   issue 25), then where that time went, from the serve log's stage lines: the waits (stable ->
   queued, queued -> claimed, done -> SR arrived: what the wake-ups govern) and the work
   (claimed -> done).
2. **Throughput**: 20 more studies are sent in one burst; images/s from the moment they are
   stable until the last object of the burst (SR or Grad-CAM SC) has arrived, against the bare
   ``Predictor`` (read, decode, preprocess, batched inference, one batch per study) on the same
   images with the same torch threads, measured first in the same run. Target ratio >= 0.8.
   The mean per-study stage times of the service (from its log) are printed too.

The model is the shipped default checkpoint when present, otherwise a random-weight 224 px
EfficientNet-B0 (plumbing only: the probabilities mean nothing).

    .venv/bin/python benchmarks/bench_e2e.py            # 20 + 20 studies
    .venv/bin/python benchmarks/bench_e2e.py --quick    # 8 + 8 studies
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import (  # noqa: E402
    dcmtk_env,
    free_port,
    serve_command,
    stop_process,
    wait_echo,
    write_synthetic_cr,
)
from ratios import print_ratio  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
#: Issue 25: p95 of last C-STORE -> SR at the destination, seconds.
P95_TARGET_S = 0.5


def make_checkpoint(folder: Path) -> Path:
    from triage_core.errors import CheckpointError
    from triage_core.models import default_checkpoint_path

    try:
        path = default_checkpoint_path()
        print(f"model: shipped default {path}")
        return path
    except CheckpointError:
        pass
    import torch

    from triage_core.models import create_model, default_spec, save_checkpoint

    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=3, pretrained=None)
    spec = default_spec("efficientnet_b0").replace(name="random-bench-model", version="0")
    path = folder / "effb0-random"
    save_checkpoint(model, spec, path)
    print("model: random-weight EfficientNet-B0, 224 px (no default checkpoint shipped)")
    return path


def make_studies(folder: Path, count: int, images: int, size: int, seed: int) -> list[list[Path]]:
    """Synthetic studies (a smooth blob plus noise; plumbing only)."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    studies = []
    for s in range(count):
        study_uid, series_uid = generate_uid(), generate_uid()
        paths = []
        for i in range(images):
            blob = np.exp(-(((yy - size * rng.random()) ** 2 + (xx - size * rng.random()) ** 2)
                            / (2 * (size / 6) ** 2)))  # fmt: skip
            pixels = (2000 + 1500 * blob + 200 * rng.random((size, size))).astype(np.uint16)
            paths.append(
                write_synthetic_cr(
                    folder / f"s{s:03d}_{i}.dcm",
                    pixels,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    patient_id=f"BENCH{s}",
                    accession=f"A{s}",
                    instance_number=i,
                )
            )
        studies.append(paths)
    return studies


def bare_predictor(model: Path, studies: Sequence[Sequence[Path]], threads: int) -> float:
    """images/s of read + decode + preprocess + batched inference (one batch per study)."""
    import torch

    from triage_core.imaging import load_image, read_dataset, to_tensor
    from triage_core.inference import Predictor

    predictor = Predictor(model, threads=threads)
    predictor.warmup()
    spec = predictor.spec
    best = 0.0
    for _ in range(2):  # the first pass also warms the batch shape; keep the faster pass
        started = time.perf_counter()
        n = 0
        for paths in studies:
            batch = torch.stack([to_tensor(load_image(read_dataset(p)), spec) for p in paths])
            predictor.predict_tensors(batch)
            n += len(paths)
        best = max(best, n / (time.perf_counter() - started))
    return best


def bare_pipeline(
    model: Path, studies: Sequence[Sequence[Path]], threads: int, sc_max_side: int
) -> float:
    """images/s of the same work as a worker, called directly, in one thread: ``triage_study``
    (with Grad-CAM) plus the SR and SC built and encoded as the service does, without the
    service (no database, files, network, no overlap of stages)."""
    import io

    import pydicom

    from triage_core.dicom_out import ReportBuilder, build_sc
    from triage_core.inference import Predictor
    from triage_core.pipeline import triage_study

    predictor = Predictor(model, threads=threads)
    predictor.warmup()
    reports = ReportBuilder(predictor.spec)
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        n = 0
        for paths in studies:
            uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
            out = triage_study(
                study_uid(paths[0]),
                list(zip(uids, paths, strict=True)),
                predictor,
                cam_max_side=sc_max_side or None,
            )
            objects = [reports.build(out.result, list(out.datasets.values()))]
            if out.cam_overlay is not None and out.cam_finding is not None:
                source = out.datasets[out.cam_source_uid]
                objects.append(build_sc(out.cam_overlay, source, out.cam_finding, predictor.spec))
            for ds in objects:
                ds.save_as(io.BytesIO(), enforce_file_format=True)
            n += len(paths)
        best = max(best, n / (time.perf_counter() - started))
    return best


class Destination:
    """A DCMTK ``storescp`` destination in its own process (as a real PACS would be).

    It writes every object it receives under ``st_<StudyInstanceUID>/`` (``--sort-on-study-uid``),
    named after its SOP class (``SR3.<uid>`` for our Comprehensive 3D SR, ``SC.<uid>`` for the
    Grad-CAM SC);
    an object's arrival time is its file's modification time (written before the C-STORE
    response is sent). Polling the folder every few milliseconds costs this process almost
    nothing, unlike a pynetdicom SCP here that decodes every dataset on the shared CPUs.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [STORESCP, "-aet", "BENCHDEST", "-od", str(folder), "-su", "st", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(),
        )  # fmt: skip
        wait_echo(self.port, timeout=30)

    def files(self, study_uid: str) -> list[Path]:
        study = self.folder / f"st_{study_uid}"
        try:
            return [p for p in study.iterdir() if not p.name.startswith(".")]
        except FileNotFoundError:
            return []

    def wait(self, study_uids: Sequence[str], count: int, timeout: float, sr_only: bool) -> None:
        """Until every study has ``count`` objects (or an SR with ``sr_only``)."""
        deadline = time.perf_counter() + timeout
        pending = list(study_uids)
        while pending:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{len(pending)} studies incomplete after {timeout} s")
            still = []
            for uid in pending:
                names = [p.name for p in self.files(uid)]
                done = any(n.startswith("SR") for n in names) if sr_only else len(names) >= count
                if not done:
                    still.append(uid)
            pending = still
            if pending:
                time.sleep(0.003)

    def arrival(self, study_uid: str, prefix: str = "") -> float:
        """Latest modification time (``time.time`` clock) of the study's objects."""
        stamps = [p.stat().st_mtime for p in self.files(study_uid) if p.name.startswith(prefix)]
        if not stamps:
            raise RuntimeError(f"study {study_uid}: nothing with prefix {prefix!r} arrived")
        return max(stamps)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def serve(
    storage: Path,
    port: int,
    model: Path,
    dest: int,
    stable_age: float,
    workers: int,
    threads: int,
    sc_max_side: int,
) -> Iterator[Path]:
    cmd = serve_command()
    log_path = storage.parent / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), "--bind-address", "127.0.0.1", "--storage",
             str(storage), "--model", str(model), "--stable-age", str(stable_age),
             "--http-port", "0", "--destination", f"BENCHDEST@127.0.0.1:{dest}",
             "--workers", str(workers), "--threads", str(threads)],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRIAGE_SC_MAX_SIDE": str(sc_max_side)},
        )  # fmt: skip
    try:
        wait_echo(port, timeout=300)
        yield log_path
    finally:
        stop_process(proc, 60)


def send(port: int, paths: Sequence[Path]) -> float:
    proc = subprocess.run(
        [STORESCU, "-aet", "MODALITY", "-aec", "CXR_TRIAGE", "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True, env=dcmtk_env(), check=False,
    )  # fmt: skip
    done = time.time()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace"))
    return done


def study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def print_stage_means(log: str) -> None:
    """Mean per-study stage times from the serve log (one line per study stage)."""
    import re

    series: dict[str, list[float]] = {}
    for line in log.splitlines():
        if "stage=done" in line:
            for key, value in re.findall(r"(\w+)=(\d+)ms", line):
                series.setdefault(key, []).append(float(value))
            match = re.search(r"stage=done in ([\d.]+) s", line)
            if match:
                series.setdefault("worker total", []).append(1e3 * float(match.group(1)))
        elif "stage=outputs" in line:
            match = re.search(r"in (\d+) ms", line)
            if match:
                series.setdefault("SR+SC build+write", []).append(float(match.group(1)))
            for key, value in re.findall(r"([\w+]+) (\d+) ms", line.split("(", 1)[-1]):
                series.setdefault(f"outputs {key}", []).append(float(value))
        elif "stage=delivered" in line:
            match = re.search(r"in (\d+) ms", line)
            if match:
                series.setdefault("delivery", []).append(float(match.group(1)))
    if series:
        print(
            "mean per study (ms): " + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in series.items())
        )


def stage_times(log: str) -> dict[tuple[str, str], float]:
    """``(study UID, stage) -> time.time()`` of the first log line of each study stage."""
    import re
    from datetime import datetime

    times: dict[tuple[str, str], float] = {}
    pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*study (\S+) stage=(\w+)")
    for line in log.splitlines():
        match = pattern.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            times.setdefault((match.group(2), match.group(3)), stamp)
    return times


def print_latency_breakdown(
    log: str, sent: dict[str, float], sr_arrival: dict[str, float], stable_age: float
) -> None:
    """Where the latency of each study went: the waits between stages (what wake-ups change)
    and the work (claim to done). Log times have millisecond resolution."""
    times = stage_times(log)
    parts: dict[str, list[float]] = {}
    for uid, last in sent.items():
        queued = times.get((uid, "queued"))
        claimed = times.get((uid, "processing"))
        done = times.get((uid, "done")) or times.get((uid, "not_eligible"))
        if None in (queued, claimed, done):
            continue
        assert queued is not None and claimed is not None and done is not None
        parts.setdefault("stable -> queued", []).append(queued - last - stable_age)
        parts.setdefault("queued -> claimed", []).append(claimed - queued)
        parts.setdefault("claimed -> done", []).append(done - claimed)
        parts.setdefault("done -> SR arrived", []).append(sr_arrival[uid] - done)
    if parts:
        print(
            "latency breakdown, mean / p95 (ms): "
            + ", ".join(
                f"{k} {1e3 * np.mean(v):.0f} / {1e3 * np.percentile(v, 95):.0f}"
                for k, v in parts.items()
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 + 8 studies")
    parser.add_argument("--studies", type=int, help="studies per phase (default 20)")
    parser.add_argument("--images", type=int, default=2, help="images per study (2)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    parser.add_argument("--stable-age", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1, help="worker threads of serve (1)")
    parser.add_argument("--keep-log", type=Path, help="copy the serve log to this file")
    parser.add_argument(
        "--sc-max-side", type=int, default=512, help="serve's sc_max_side (512; 0: source size)"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides"
    )
    args = parser.parse_args(argv)
    count = args.studies or (8 if args.quick else 20)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        model = make_checkpoint(work)
        latency_set = make_studies(work / "lat", count, args.images, args.size, 1)
        burst_set = make_studies(work / "burst", count, args.images, args.size, 2)
        bare = bare_predictor(model, burst_set, threads=args.threads)
        print(f"bare Predictor (read+decode+preprocess+inference): {bare:.1f} images/s")
        direct = bare_pipeline(model, burst_set, args.threads, args.sc_max_side)
        print(f"bare pipeline (the same + Grad-CAM + SR/SC built): {direct:.1f} images/s")
        dest = Destination(work / "destination")
        port = free_port()
        try:
            with serve(
                work / "storage", port, model, dest.port, args.stable_age, args.workers,
                args.threads, args.sc_max_side,
            ) as log_path:  # fmt: skip
                latencies = []
                sent: dict[str, float] = {}
                sr_arrival: dict[str, float] = {}
                for paths in latency_set:
                    uid = study_uid(paths[0])
                    sent[uid] = last = send(port, paths)
                    dest.wait([uid], 2, 120, sr_only=True)
                    sr_arrival[uid] = dest.arrival(uid, "SR")
                    latencies.append(sr_arrival[uid] - last - args.stable_age)
                dest.wait([study_uid(p[0]) for p in latency_set], 2, 120, sr_only=False)
                uids = [study_uid(p[0]) for p in burst_set]
                last = send(port, [p for paths in burst_set for p in paths])
                # the window ends when the LAST object of the burst (SR or SC) has arrived
                dest.wait(uids, 2, 600, sr_only=False)
                time.sleep(0.2)  # let the last files be closed before reading their times
                end = max(dest.arrival(u) for u in uids)
                throughput = count * args.images / (end - last - args.stable_age)
        finally:
            dest.close()
        lat = np.array(latencies)
        print(
            f"latency last C-STORE -> SR at destination, minus stable age ({count} studies x "
            f"{args.images} images of {args.size} px): p50 {np.percentile(lat, 50):.3f} s, "
            f"p95 {np.percentile(lat, 95):.3f} s, max {lat.max():.3f} s (target p95 < "
            f"{P95_TARGET_S} s: {'met' if np.percentile(lat, 95) < P95_TARGET_S else 'missed'})"
        )
        print(
            f"pipeline through the workers (until the last SR and SC arrived): "
            f"{throughput:.1f} images/s; ratio to the bare Predictor {throughput / bare:.2f} "
            f"(target >= 0.8; the workers also compute Grad-CAM, build, store and send the SR "
            f"and SC); ratio to the bare pipeline {throughput / direct:.2f} (what the service "
            f"itself costs)"
        )
        per_study = args.images / direct  # seconds the bare pipeline takes for one study
        print_ratio(
            "e2e p95 latency (last C-STORE -> SR) / bare pipeline time of one study",
            float(np.percentile(lat, 95)),
            per_study,
        )
        print_ratio(
            "e2e workers / bare Predictor, images/s in a burst", throughput, bare, target=0.8
        )
        print_ratio("e2e workers / bare pipeline, images/s in a burst", throughput, direct)
        print_stage_means(log_path.read_text())
        print_latency_breakdown(log_path.read_text(), sent, sr_arrival, args.stable_age)
        if args.keep_log:
            shutil.copy(log_path, args.keep_log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
