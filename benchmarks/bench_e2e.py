"""End-to-end latency and worker throughput of ``triage serve`` (EfficientNet-B0, CPU).

1. **Latency**: 20 studies (2 synthetic 1024 px CR images each; plumbing only) are sent one after
   the other with DCMTK ``storescu``; for each, the time from the last C-STORE response to the
   SR arriving at a destination (a pynetdicom SCP in this process), minus ``--stable-age``.
   p50 and p95 are printed (target p95 < 1 s on the 2-core machine).
2. **Throughput**: 20 more studies are sent in one burst; images/s from the moment they are
   stable until the last SR arrives, against the bare ``Predictor`` (read, decode, preprocess,
   batched inference) on the same images, measured first in the same run. Target ratio >= 0.8.

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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import (  # noqa: E402
    dcmtk_env,
    free_port,
    serve_command,
    wait_echo,
    write_synthetic_cr,
)

STORESCU = "/usr/bin/storescu"


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


def bare_pipeline(model: Path, studies: Sequence[Sequence[Path]], threads: int) -> float:
    """images/s of the same work as a worker, called directly: ``triage_study`` (with Grad-CAM)
    plus the SR and SC built and encoded, without the service (no database, files, network)."""
    import io

    import pydicom

    from triage_core.dicom_out import build_sc, build_sr
    from triage_core.inference import Predictor
    from triage_core.pipeline import triage_study

    predictor = Predictor(model, threads=threads)
    predictor.warmup()
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        n = 0
        for paths in studies:
            uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
            out = triage_study(study_uid(paths[0]), list(zip(uids, paths, strict=True)), predictor)
            objects = [build_sr(out.result, list(out.datasets.values()), predictor.spec)]
            if out.cam_overlay is not None and out.cam_finding is not None:
                source = out.datasets[out.cam_source_uid]
                objects.append(build_sc(out.cam_overlay, source, out.cam_finding, predictor.spec))
            for ds in objects:
                ds.save_as(io.BytesIO(), enforce_file_format=True)
            n += len(paths)
        best = max(best, n / (time.perf_counter() - started))
    return best


class Destination:
    """A pynetdicom C-STORE SCP that notes when each SR arrives (per study)."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.sr_at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.port = free_port()
        ae = AE(ae_title="BENCHDEST")
        ae.maximum_pdu_size = 0  # unlimited: the destination should not be the bottleneck
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax))

        def store(event: evt.Event) -> int:
            now = time.perf_counter()
            ds = event.dataset
            if ds.Modality == "SR":
                with self.lock:
                    self.sr_at.setdefault(str(ds.StudyInstanceUID), now)
            return 0x0000

        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
        )
        assert server is not None
        self.server = server

    def wait(self, study_uids: Sequence[str], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            with self.lock:
                if all(uid in self.sr_at for uid in study_uids):
                    return
            time.sleep(0.002)
        raise RuntimeError(f"SRs missing after {timeout} s")


@contextlib.contextmanager
def serve(
    storage: Path,
    port: int,
    model: Path,
    dest: int,
    stable_age: float,
    workers: int,
    threads: int,
) -> Iterator[Path]:
    cmd = serve_command()
    log_path = storage.parent / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), "--bind-address", "127.0.0.1", "--storage",
             str(storage), "--model", str(model), "--stable-age", str(stable_age),
             "--http-port", "0", "--destination", f"BENCHDEST@127.0.0.1:{dest}",
             "--workers", str(workers), "--threads", str(threads)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    try:
        wait_echo(port, timeout=300)
        yield log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def send(port: int, paths: Sequence[Path]) -> float:
    proc = subprocess.run(
        [STORESCU, "-aet", "MODALITY", "-aec", "CXR_TRIAGE", "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True, env=dcmtk_env(), check=False,
    )  # fmt: skip
    done = time.perf_counter()
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
        elif "stage=delivered" in line:
            match = re.search(r"in (\d+) ms", line)
            if match:
                series.setdefault("delivery", []).append(float(match.group(1)))
    if series:
        print(
            "mean per study (ms): " + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in series.items())
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 + 8 studies")
    parser.add_argument("--studies", type=int, help="studies per phase (default 20)")
    parser.add_argument("--images", type=int, default=2, help="images per study (2)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    parser.add_argument("--stable-age", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1, help="worker threads of serve (1)")
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
        direct = bare_pipeline(model, burst_set, threads=args.threads)
        print(f"bare pipeline (the same + Grad-CAM + SR/SC built): {direct:.1f} images/s")
        dest = Destination()
        port = free_port()
        with serve(
            work / "storage", port, model, dest.port, args.stable_age, args.workers, args.threads
        ) as log_path:
            latencies = []
            for paths in latency_set:
                uid = study_uid(paths[0])
                last = send(port, paths)
                dest.wait([uid], 120)
                latencies.append(dest.sr_at[uid] - last - args.stable_age)
            uids = [study_uid(p[0]) for p in burst_set]
            last = send(port, [p for paths in burst_set for p in paths])
            dest.wait(uids, 600)
            end = max(dest.sr_at[u] for u in uids)
            throughput = count * args.images / (end - last - args.stable_age)
        dest.server.shutdown()
        lat = np.array(latencies)
        print(
            f"latency last C-STORE -> SR at destination, minus stable age ({count} studies x "
            f"{args.images} images of {args.size} px): p50 {np.percentile(lat, 50):.3f} s, "
            f"p95 {np.percentile(lat, 95):.3f} s, max {lat.max():.3f} s (target p95 < 1 s)"
        )
        print(
            f"pipeline through the workers: {throughput:.1f} images/s; ratio to the bare "
            f"Predictor {throughput / bare:.2f} (target >= 0.8; the workers also compute "
            f"Grad-CAM, build, store and send the SR and SC); ratio to the bare pipeline "
            f"{throughput / direct:.2f} (what the service itself costs)"
        )
        print_stage_means(log_path.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
