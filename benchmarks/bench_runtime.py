"""The serving runtime (issue 15): start time, idle memory, inference speed; ONNX Runtime vs torch.

1. **Start**: ``triage serve`` on a warm install (a storage folder that exists), seconds from the
   process start to the first answered C-ECHO and to ``/healthz/ready`` (model loaded), for
   ``--runtime onnxruntime`` (the default) and ``--runtime torch``, interleaved, medians.
2. **Memory**: resident memory of the whole node (the serve process and its children) once
   ready, and after ``--studies`` synthetic studies (one 512 px CR each, plumbing only) have been
   triaged, per runtime. The baseline of 1 and 2, same run: Orthanc's time to its first C-ECHO
   and its idle RSS (Debian's ``orthanc``, no plugins, warm index).
3. **Inference**: ms per image at batch 1 and 16, 224 px, the shipped Lite0 and random-weight
   ResNet-18 and EfficientNet-B0: ONNX Runtime (graph optimisation ``all``; ResNet-18 also
   ``basic`` and ``disable``) against torch eager channels_last, same threads, interleaved
   repetitions, medians; ratio = torch / ONNX Runtime.
4. **Workers**: studies per second of ``triage_core.pipeline.triage_study`` (read, decode,
   preprocess, infer, CAM) over the shared chest DICOMs, one study each, per runtime.
5. **Imports**: RSS and Python heap (tracemalloc) that each package the serving process may
   import adds, in a fresh interpreter (where the idle RSS goes).

Every ratio is printed as a ``RATIO`` line (``benchmarks/ratios.py``), with issue 25's targets.

    .venv/bin/python benchmarks/bench_runtime.py            # full run (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_runtime.py --quick    # fewer repetitions and studies,
                                                            # ONNX Runtime at level "all" only

Name the CPU with the figures (printed first) and say whether the machine was busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ratios import print_ratio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's packages, not another editable install
SHARED = Path(os.environ.get("CXR_TRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
ECHOSCU, STORESCU = "/usr/bin/echoscu", "/usr/bin/storescu"
#: Issue 25's start and memory targets (the default runtime, warm install).
START_TARGET_S, READY_AFTER_S, IDLE_RSS_TARGET_MB = 1.0, 2.0, 250


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (MB)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry.name)] = int(line.split()[1])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total / 1024


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _echo(port: int) -> bool:
    proc = subprocess.run(
        [ECHOSCU, "-aec", "CXR_TRIAGE", "-to", "2", "127.0.0.1", str(port)],
        capture_output=True, timeout=10, env=dcmtk_env(), check=False,
    )  # fmt: skip
    return proc.returncode == 0


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http_port}/healthz/ready", timeout=2
        ) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Serve:
    """One ``triage serve`` subprocess with its own ports."""

    def __init__(self, storage: Path, runtime: str) -> None:
        self.storage, self.runtime = storage, runtime
        self.port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> tuple[float, float]:
        """Seconds to the first C-ECHO answer and to ready."""
        cmd = [sys.executable, "-m", "dicom_node", "serve", "--storage", str(self.storage)]
        cmd += ["--port", str(self.port), "--http-port", str(self.http_port)]
        cmd += ["--runtime", self.runtime, "--stable-age", "0.3"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        echo = ready = None
        while ready is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"triage serve exited with {self.proc.returncode}")
            if echo is None and _echo(self.port):
                echo = time.perf_counter() - started
            if echo is not None and _ready(self.http_port):
                ready = time.perf_counter() - started
            if time.perf_counter() - started > 300:
                raise RuntimeError("triage serve not ready after 300 s")
            time.sleep(0.02)
        return echo, ready

    def rss(self) -> float:
        assert self.proc is not None
        return tree_rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def bench_start(runtimes: list[str], repeats: int, studies: int) -> dict[str, dict[str, float]]:
    import pydicom

    sys.path.insert(0, str(REPO / "tests" / "node"))
    from test_node_support import synthetic_cr  # plumbing images

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = [synthetic_cr(Path(tmp) / f"s{i}.dcm", size=512, seed=i) for i in range(studies)]
        times: dict[str, list[tuple[float, float]]] = {r: [] for r in runtimes}
        rss: dict[str, tuple[float, float]] = {}
        for runtime in runtimes:  # first start of each: creates the storage folder and schema
            serve = Serve(Path(tmp) / f"storage-{runtime}", runtime)
            serve.start()
            serve.stop()
        for rep in range(repeats):
            for runtime in runtimes:
                serve = Serve(Path(tmp) / f"storage-{runtime}", runtime)
                try:
                    times[runtime].append(serve.start())
                    if rep == repeats - 1 and studies:
                        time.sleep(2.0)  # settle: the outputs process's imports
                        idle = serve.rss()
                        for chunk in range(0, len(files), 25):
                            subprocess.run(
                                [STORESCU, "-aec", "CXR_TRIAGE", "127.0.0.1", str(serve.port),
                                 *map(str, files[chunk : chunk + 25])],
                                check=True, capture_output=True, env=dcmtk_env(), timeout=300,
                            )  # fmt: skip
                        outbox = Path(tmp) / f"storage-{runtime}" / "outbox"
                        deadline = time.monotonic() + 600
                        done = 0
                        while done < len(files) and time.monotonic() < deadline:
                            done = sum(1 for d in outbox.iterdir() if any(d.glob("*.dcm")))
                            time.sleep(0.5)
                        time.sleep(1.0)
                        rss[runtime] = (idle, serve.rss())
                finally:
                    serve.stop()
        for runtime in runtimes:
            echo = statistics.median(t[0] for t in times[runtime])
            ready = statistics.median(t[1] for t in times[runtime])
            row = {"first_echo_s": echo, "ready_s": ready}
            if runtime in rss:
                row["idle_rss_mb"], row["rss_after_studies_mb"] = rss[runtime]
            out[runtime] = row
        del pydicom
    return out


def bench_orthanc_start(repeats: int) -> dict[str, float] | None:
    """The baseline of the start figures, same run: Orthanc (Debian's, no plugins, a warm
    storage area and index) from exec to its first answered C-ECHO, median of ``repeats``,
    and its RSS 2 s after that (as for ``triage serve``). ``None`` where it is not installed."""
    from bench_ingest import ORTHANC, orthanc_config

    if not ORTHANC.exists():
        return None
    times, rss = [], float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = orthanc_config(Path(tmp) / "orthanc", port, free_port())
        for rep in range(repeats + 1):  # the first start creates the index: not timed
            started = time.perf_counter()
            proc = subprocess.Popen(
                [str(ORTHANC), str(config)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(),
            )  # fmt: skip
            try:
                while not _echo(port):
                    if proc.poll() is not None or time.perf_counter() - started > 120:
                        raise RuntimeError("Orthanc did not answer C-ECHO")
                    time.sleep(0.02)
                if rep:
                    times.append(time.perf_counter() - started)
                if rep == repeats:
                    time.sleep(2.0)
                    rss = tree_rss_mb(proc.pid)
            finally:
                proc.terminate()
                proc.wait(60)
    return {"first_echo_s": statistics.median(times), "idle_rss_mb": rss}


#: What the serving process may import, in the order measured by :func:`bench_imports`.
SERVING_IMPORTS = (
    "numpy",
    "pydicom",
    "pynetdicom",
    "sqlalchemy",
    "alembic",
    "fastapi",
    "uvicorn",
    "onnxruntime",
    "PIL.Image",
    "highdicom",
    "cv2",
    "dicom_node.commands.serve",
)
_IMPORT_PROBE = """
import importlib, json, sys, time, tracemalloc
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
traced = sys.argv[1] == "heap"
if traced:
    tracemalloc.start()
rows, before = [], rss()
for name in sys.argv[2:]:
    t0, r0 = time.perf_counter(), rss()
    m0 = tracemalloc.get_traced_memory()[0] if traced else 0
    try:
        importlib.import_module(name)
        ok = True
    except ImportError:
        ok = False
    heap = (tracemalloc.get_traced_memory()[0] - m0) / 2**20 if traced else 0.0
    rows.append([name, ok, rss() - r0, heap, time.perf_counter() - t0])
print(json.dumps({"start_rss_mb": before, "rows": rows}))
"""


def bench_imports() -> dict[str, object]:
    """RSS, seconds and Python heap (tracemalloc) added by each import of
    :data:`SERVING_IMPORTS`, in that order, in fresh interpreters (each figure is what the
    module adds on top of those before it): what each package costs the node if the serving
    path imports it. RSS and seconds come from a pass without tracemalloc (which slows imports
    and holds memory of its own), the heap from a second pass with it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    passes = {}
    for mode in ("plain", "heap"):
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, mode, *SERVING_IMPORTS],
            capture_output=True, text=True, check=True, env=env, timeout=300,
        )  # fmt: skip
        passes[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, heap = passes["plain"], passes["heap"]
    rows = [
        [name, ok, rss, traced[3], seconds]
        for (name, ok, rss, _, seconds), traced in zip(plain["rows"], heap["rows"], strict=True)
    ]
    return {"start_rss_mb": plain["start_rss_mb"], "rows": rows}


def _torch_timer(arch: str, threads: int) -> tuple[Callable[[np.ndarray], object], object]:
    import torch

    from triage_core.models import create_model, default_checkpoint_path, load_checkpoint

    torch.set_num_threads(threads)
    if arch == "efficientnet_lite0":
        model, _ = load_checkpoint(default_checkpoint_path())
    else:
        torch.manual_seed(0)
        model = create_model(arch, 3, pretrained=None)
    model = model.eval().to(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    return run, model


def bench_inference(
    archs: list[str], threads: int, repeats: int, all_levels: bool = True
) -> list[tuple[str, str, int, float, float]]:
    """Rows ``(arch, ORT option, batch, torch ms/image, ORT ms/image)``; ResNet-18 also at
    the lower graph optimisation levels when ``all_levels``."""
    from training.onnx_export import _set_metadata, _write_graph, linear_head
    from triage_core.models import default_spec
    from triage_core.runtime import SessionOptions, create_session, graph_metadata

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            run_torch, model = _torch_timer(arch, threads)
            spec = default_spec(arch)
            graph = Path(tmp) / f"{arch}.onnx"
            _write_graph(model, spec, graph)  # type: ignore[arg-type]
            _set_metadata(graph, graph_metadata(spec, "-", linear_head(model, arch)))  # type: ignore[arg-type]
            levels = ["all", "basic", "disable"] if arch == "resnet18" and all_levels else ["all"]
            for level in levels:
                session = create_session(graph, SessionOptions(threads=threads, optimization=level))
                for batch in (1, 16):
                    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224))
                    x = x.astype(np.float32)
                    t_torch, t_ort = [], []
                    run_torch(x)
                    session.run(None, {"input": x})
                    for _ in range(repeats if batch == 1 else max(2, repeats // 4)):
                        t0 = time.perf_counter()
                        run_torch(x)
                        t1 = time.perf_counter()
                        session.run(None, {"input": x})
                        t2 = time.perf_counter()
                        t_torch.append((t1 - t0) * 1e3 / batch)
                        t_ort.append((t2 - t1) * 1e3 / batch)
                    rows.append(
                        (arch, level, batch, statistics.median(t_torch), statistics.median(t_ort))
                    )
    return rows


def bench_workers(threads: int, rounds: int) -> dict[str, float]:
    """Studies per second of triage_study over the shared chest DICOMs, per runtime."""
    from triage_core.imaging import check_eligibility, read_dataset
    from triage_core.inference import Predictor
    from triage_core.pipeline import triage_study

    chest = []
    for path in sorted((SHARED / "dicom").glob("*.dcm")):
        try:
            ds = read_dataset(path, stop_before_pixels=True)
            if check_eligibility(ds)[0]:
                chest.append((str(ds.SOPInstanceUID), path))
        except Exception:  # noqa: BLE001 - a benchmark skips what it cannot read
            continue
    out = {}
    predictors = {
        "onnxruntime": Predictor(runtime="onnxruntime", threads=threads),
        "torch": Predictor(runtime="torch", threads=threads),
    }
    for predictor in predictors.values():
        triage_study("1.2.3", chest[:1], predictor, cam_max_side=512)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(rounds):
        for name, predictor in predictors.items():
            t0 = time.perf_counter()
            for uid, path in chest:
                triage_study("1.2.3", [(uid, path)], predictor, cam_max_side=512)
            times[name].append(len(chest) / (time.perf_counter() - t0))
    for name in predictors:
        out[name] = statistics.median(times[name])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--studies", type=int, help="studies for the memory figure (100)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["start", "inference", "workers", "imports"]
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 15
    studies = args.studies if args.studies is not None else (10 if args.quick else 100)
    load = os.getloadavg()[0]
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; load {load:.1f}")
    results: dict[str, object] = {"cpu": cpu_name(), "load_before": load}
    if "inference" not in args.skip:
        rows = bench_inference(
            ["efficientnet_lite0", "resnet18", "efficientnet_b0"],
            args.threads,
            repeats,
            all_levels=not args.quick,
        )
        print("\n| model | ORT graph optimisation | batch | torch channels_last ms/img "
              "| ONNX Runtime ms/img | torch / ORT |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for arch, level, batch, t_torch, t_ort in rows:
            print(f"| {arch} | {level} | {batch} | {t_torch:.1f} | {t_ort:.1f} | "
                  f"{t_torch / t_ort:.2f}x |")  # fmt: skip
        results["inference"] = rows
        for arch, level, batch, t_torch, t_ort in rows:
            if level == "all":
                print_ratio(
                    f"runtime {arch} batch {batch}, torch / ONNX Runtime ms per image",
                    t_torch,
                    t_ort,
                )
    if "workers" not in args.skip:
        rates = bench_workers(args.threads, 2 if args.quick else 3)
        print("\n| runtime | studies/s (triage_study, shared chest DICOMs, CAM included) |")
        print("|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.2f} |")
        print_ratio(
            "runtime workers, onnxruntime / torch studies per second",
            rates["onnxruntime"],
            rates["torch"],
        )
        results["workers"] = rates
    if "start" not in args.skip and shutil.which(ECHOSCU):
        start = bench_start(["onnxruntime", "torch"], 2 if args.quick else 3, studies)
        print(f"\n| runtime | first C-ECHO s | ready s | idle RSS MB | RSS after {studies} "
              "studies MB |")  # fmt: skip
        print("|---|---|---|---|---|")
        for name, row in start.items():
            print(f"| {name} | {row['first_echo_s']:.2f} | {row['ready_s']:.2f} | "
                  f"{row.get('idle_rss_mb', float('nan')):.0f} | "
                  f"{row.get('rss_after_studies_mb', float('nan')):.0f} |")  # fmt: skip
        results["start"] = start
        base = bench_orthanc_start(2 if args.quick else 5)
        results["orthanc_start"] = base
        ours = start["onnxruntime"]
        if base is not None:
            print(f"| Orthanc (baseline) | {base['first_echo_s']:.2f} | - | "
                  f"{base['idle_rss_mb']:.0f} | - |")  # fmt: skip
        missing = "Orthanc not installed (apt-get install -y orthanc)"
        base = base or {}
        print_ratio(
            "runtime first C-ECHO after start, triage serve / Orthanc (lower is better)",
            ours["first_echo_s"],
            base.get("first_echo_s"),
            lower=True,
            why_missing=missing,
        )
        print_ratio(
            "runtime idle RSS, triage serve / Orthanc (lower is better)",
            ours.get("idle_rss_mb"),
            base.get("idle_rss_mb"),
            lower=True,
            why_missing=missing,
        )
        for what, value, target in (
            ("first C-ECHO", ours["first_echo_s"], f"<= {START_TARGET_S} s"),
            ("ready after the first C-ECHO", ours["ready_s"] - ours["first_echo_s"],
             f"<= {READY_AFTER_S} s"),
            ("idle RSS", ours.get("idle_rss_mb", float("nan")), f"<= {IDLE_RSS_TARGET_MB} MB"),
        ):  # fmt: skip
            limit = float(target.split()[1])
            verdict = "met" if value <= limit else "missed"
            print(f"issue 25 target, onnxruntime {what}: {value:.2f} ({target}: {verdict})")
    if "imports" not in args.skip:
        probe = bench_imports()
        print(f"\n| import (in this order, fresh interpreter from {probe['start_rss_mb']:.0f} MB)"
              " | RSS added MB | Python heap added MB | s |")  # fmt: skip
        print("|---|---|---|---|")
        for name, ok, rss, heap, seconds in probe["rows"]:  # type: ignore[attr-defined]
            shown = name if ok else f"{name} (not installed)"
            print(f"| {shown} | {rss:.1f} | {heap:.1f} | {seconds:.2f} |")
        results["imports"] = probe
    print(f"\nload after: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
