"""Benchmark of the triage core: preprocessing, inference paths, Predictor, Grad-CAM.

Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py            # full run (~5-10 min on 2 cores)
    .venv/bin/python benchmarks/bench_core.py --quick    # fewer repetitions, no torch.compile
    .venv/bin/python benchmarks/bench_core.py --no-compile   # skip torch.compile (~20 s/shape)
    .venv/bin/python benchmarks/bench_core.py --arch efficientnet_lite0 --int8   # one arch, + int8

``--int8`` adds a static int8 path (FX graph mode, x86 backend, ``benchmarks/int8_cpu.py``) and,
for a trained checkpoint, the adoption check of issue 8: per-class AUROC of fp32 and int8 on the
checkpoint's test split and the share of flipped decisions (adopt only within 0.01 and 1 %).

ONNX Runtime rows are measured only when ``onnxruntime`` and ``onnx`` are importable (they are
not project dependencies; e.g. ``pip install --target /tmp/ort onnxruntime onnx protobuf
flatbuffers ml_dtypes`` and ``PYTHONPATH=/tmp/ort``).

Every ratio compares numbers measured in the same run, on the same tensors. Models have random
weights unless a trained checkpoint is given (``--checkpoint NAME``, repeatable) or shipped in
``triage_core/weights``; a checkpoint is used for its own architecture and input size.
Probability drift on random weights (probabilities near 0.5) is only indicative.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ratios import print_ratio

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench_core")

TOLERANCE = 0.01
ARCHS = ("resnet18", "efficientnet_b0", "efficientnet_lite0")


def _median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call, alternating the candidates so load changes hit all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_preprocessing(data: Path, size: int, reps: int) -> list[dict[str, Any]]:
    from triage_core.errors import ImageReadError
    from triage_core.imaging import load_image, to_tensor
    from triage_core.models import default_spec

    spec = default_spec("efficientnet_b0").replace(input_size=size)
    rows: list[dict[str, Any]] = []
    files = sorted((data / "dicom").glob("*.dcm"))
    for path in files:
        try:
            image = load_image(path)
        except ImageReadError as exc:
            rows.append({"file": path.name, "error": str(exc)})
            continue

        def prepare(p: Path = path) -> Any:
            return to_tensor(load_image(p), spec)

        seconds = _median_seconds(prepare, reps, warmup=0)
        rows.append(
            {
                "file": path.name,
                "shape": f"{image.shape[0]}x{image.shape[1]}",
                "ms": seconds * 1e3,
            }
        )
    return rows


def _inputs(data: Path | None, spec: Any, n: int, offset: int = 0) -> Any:
    """``n`` real NIH PNGs (from the ``offset``-th) through ``to_tensor`` with ``spec``'s
    size and normalisation, or random tensors without the shared data."""
    import torch

    from triage_core.imaging import load_image, to_tensor

    size = spec.input_size
    pngs = sorted((data / "cxr14" / "256").glob("*.png")) if data is not None else []
    pngs = pngs[offset : offset + n]
    if len(pngs) == n:
        return torch.stack([to_tensor(load_image(p), spec) for p in pngs]), "real NIH PNGs"
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=gen), "random tensors"


def _model_and_spec(arch: str, size: int, checkpoints: list[Path]) -> tuple[Any, Any, str]:
    """A trained checkpoint of ``arch`` (``--checkpoint`` first, then the shipped default),
    else random weights at ``size``."""
    import torch

    from triage_core.errors import CheckpointError
    from triage_core.models import create_model, default_checkpoint_path, default_spec
    from triage_core.models import load_checkpoint as load

    candidates = list(checkpoints)
    try:
        candidates.append(default_checkpoint_path())
    except CheckpointError:
        pass
    for path in candidates:
        model, spec = load(path)
        if spec.arch == arch:
            return model, spec, f"trained checkpoint {path.name}, {spec.input_size} px"
    torch.manual_seed(0)
    model = create_model(arch).eval()
    return model, default_spec(arch).replace(input_size=size), f"random weights, {size} px"


def _onnx_runner(model: Any, size: int, threads: int) -> Callable[[Any], Any] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import torch

    path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: Any) -> Any:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    return run


def bench_paths(
    arch: str,
    size: int,
    reps1: int,
    reps16: int,
    with_compile: bool,
    threads: int,
    data: Path | None,
    checkpoints: list[Path],
    with_int8: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """ms/image per path at batch 1 and 16, and max |p - p_eager| over the 16 images."""
    import contextlib

    import torch

    from triage_core.inference import calibrate

    model, spec, origin = _model_and_spec(arch, size, checkpoints)
    x16, source = _inputs(data, spec, 16)  # normalised with this model's mean/std
    size = spec.input_size
    x16 = x16.contiguous()
    x1 = x16[:1].contiguous()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x16_cl = x16.contiguous(memory_format=torch.channels_last)
    x1_cl = x1.contiguous(memory_format=torch.channels_last)

    def bf16() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    none = contextlib.nullcontext

    paths: dict[str, tuple[Any, Any, Any, Callable[[], Any]]] = {
        "eager fp32": (model, x1, x16, none),
        "channels_last": (cl, x1_cl, x16_cl, none),
        "channels_last + bf16": (cl, x1_cl, x16_cl, bf16),
    }
    compile_seconds: dict[str, float] = {}
    if with_compile:
        for name, ctx in (("compile + channels_last", none), ("compile + cl + bf16", bf16)):
            start = time.perf_counter()
            compiled = torch.compile(copy.deepcopy(cl), dynamic=False, options={"freezing": True})
            with torch.inference_mode(), ctx():
                compiled(x1_cl)
                compiled(x16_cl)
            compile_seconds[name] = time.perf_counter() - start
            paths[name] = (compiled, x1_cl, x16_cl, ctx)
    int8_model = None
    if with_int8:
        from int8_cpu import quantize_static

        calibration, _ = _inputs(data, spec, 64, offset=16)  # not the measured images
        start = time.perf_counter()
        int8_model = quantize_static(model, size, calibration)
        compile_seconds[INT8_PATH] = time.perf_counter() - start
        paths[INT8_PATH] = (int8_model, x1, x16, none)

    def runner(module: Any, x: Any, ctx: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode(), ctx():
                return module(x).float()

        return call

    with torch.inference_mode():
        reference = calibrate(model(x16), spec)
    calls1 = {name: runner(m, in1, ctx) for name, (m, in1, _, ctx) in paths.items()}
    calls16 = {name: runner(m, in16, ctx) for name, (m, _, in16, ctx) in paths.items()}
    onnx = _onnx_runner(model, size, threads)
    if onnx is not None:
        calls1["ONNX Runtime fp32"] = lambda: onnx(x1)
        calls16["ONNX Runtime fp32"] = lambda: onnx(x16)
    # all paths alternate within each repetition: load changes on a shared machine hit all alike
    t1 = _interleaved(calls1, reps1)
    t16 = _interleaved(calls16, reps16)
    thresholds = np.asarray(spec.thresholds, dtype=np.float32)
    rows = []
    for name, call in calls16.items():
        probs = calibrate(call(), spec)
        rows.append(
            {
                "arch": arch,
                "path": name,
                "ms_b1": t1[name] * 1e3,
                "ms_b16": t16[name] * 1e3 / 16,
                "max_dprob": float(np.abs(probs - reference).max()),
                # present/absent decisions (at the spec's thresholds) that differ from eager fp32
                "flips": int(((probs >= thresholds) != (reference >= thresholds)).sum()),
                "compile_s": compile_seconds.get(name),
            }
        )
    bare = {name: call for name, call in calls16.items() if name in paths}
    context = {
        "model": model,
        "spec": spec,
        "origin": origin,
        "bare": bare,
        "x16": x16,
        "source": source,
        "int8": int8_model,
    }
    return rows, context


INT8_PATH = "int8 static (FX, x86)"


def int8_adoption(context: dict[str, Any], data: Path) -> dict[str, Any] | None:
    """The adoption check of ``int8_cpu`` on the trained checkpoint's test split."""
    from int8_cpu import adoption_check

    from training.data import attach_images, index_images, load_tensors
    from training.evaluate import rebuild_split

    spec = context["spec"]
    if context["int8"] is None or not context["origin"].startswith("trained"):
        return None
    images = data / "cxr14" / "256"
    split = rebuild_split(spec, images, data / "cxr14" / "labels.csv", "test")
    _, paths = attach_images(split.records, index_images(images))
    tensors = load_tensors(paths, spec).float()
    return adoption_check(context["model"], spec, context["int8"], tensors, split.multi_hot())


MODE_OF_PATH = {
    "eager fp32": "eager",
    "channels_last": "channels_last",
    "channels_last + bf16": "bf16",
    "compile + channels_last": "compile",
    "compile + cl + bf16": "compile_bf16",
}


def bench_predictor(context: dict[str, Any], path: str, reps: int) -> dict[str, Any]:
    """Predictor (mode of ``path``) images/s against the bare path, same 16 tensors."""
    from triage_core.inference import Predictor

    mode = MODE_OF_PATH[path]
    predictor = Predictor(
        model=copy.deepcopy(context["model"]), spec=context["spec"], mode=mode, batch_size=16
    )
    if mode.startswith("compile"):
        predictor.warmup()
    x16 = context["x16"]
    medians = _interleaved(
        {"bare": context["bare"][path], "predictor": lambda: predictor.predict_tensors(x16)},
        reps,
    )
    return {
        "path": path,
        "mode": predictor.mode,
        "bare_img_s": 16 / medians["bare"],
        "predictor_img_s": 16 / medians["predictor"],
        "ratio": medians["bare"] / medians["predictor"],
    }


def bench_cam(context: dict[str, Any], reps: int, data: Path | None) -> dict[str, Any]:
    import torch

    from triage_core.cam import CamExplainer

    model, spec = context["model"], context["spec"]
    explainer = CamExplainer(model, spec)
    x1 = context["x16"][:1].contiguous()

    def forward() -> Any:
        with torch.inference_mode():
            return model(x1)

    medians = _interleaved(
        {"forward": forward, "cam": lambda: explainer.square_map(x1[0], 0)}, reps
    )
    out: dict[str, Any] = {
        "arch": spec.arch,
        "forward_ms": medians["forward"] * 1e3,
        "cam_ms": medians["cam"] * 1e3,
        "ratio": medians["cam"] / medians["forward"],
    }
    chest = data / "dicom" / "RG1_J2KI.dcm" if data is not None else None
    if chest is not None and chest.is_file():
        from triage_core.imaging import load_image

        image = load_image(chest)
        out["explain_full_res_ms"] = 1e3 * _median_seconds(
            lambda: explainer.explain(image, 0), max(1, reps // 4), warmup=1
        )
        out["full_res_shape"] = f"{image.shape[0]}x{image.shape[1]}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions, no torch.compile paths"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile paths")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("CXR_TRIAGE_SHARED_DATA", REPO.parent / "shared" / "data")),
    )
    parser.add_argument(
        "--arch",
        action="append",
        choices=ARCHS,
        help="architecture to measure (repeatable; default: all)",
    )
    parser.add_argument("--int8", action="store_true", help="add the static int8 path")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        help="trained checkpoint NAME to use for its architecture (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.quick:  # compiling takes ~20 s per shape: the full run measures those paths
        args.no_compile = True
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    data = args.data if args.data.is_dir() else None
    reps1, reps16, reps_pre = (8, 3, 1) if args.quick else (30, 8, 3)
    print(f"# bench_core: torch {torch.__version__}, {threads} threads, input {args.size}px")
    results: dict[str, Any] = {"threads": threads, "size": args.size}

    # 1. preprocessing
    if data is not None:
        rows = bench_preprocessing(data, args.size, reps_pre)
        results["preprocessing"] = rows
        print("\n## load_image + to_tensor per shared DICOM file\n")
        print("| file | rows x cols | ms |\n|---|---|---|")
        for row in rows:
            if "error" in row:
                print(f"| {row['file']} | - | error: {row['error']} |")
            else:
                print(f"| {row['file']} | {row['shape']} | {row['ms']:.0f} |")
    else:
        print("\n(shared data absent: preprocessing not measured, random input tensors)")

    # 2. inference paths
    all_rows: list[dict[str, Any]] = []
    contexts = {}
    for arch in args.arch or ARCHS:
        rows, context = bench_paths(
            arch,
            args.size,
            reps1,
            reps16,
            not args.no_compile,
            threads,
            data,
            args.checkpoint,
            args.int8,
        )
        all_rows.extend(rows)
        contexts[arch] = context
    source = next(iter(contexts.values()))["source"]
    results["paths"] = all_rows
    print(f"\n## CPU inference paths ({source}; ms per image; drift vs eager fp32)\n")
    print(
        "| arch | path | batch 1 | batch 16 | x eager (b16) | max abs dprob | decision flips "
        "| compile s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in all_rows:
        eager = next(r for r in all_rows if r["arch"] == row["arch"] and r["path"] == "eager fp32")
        compile_s = f"{row['compile_s']:.0f}" if row["compile_s"] else "-"
        print(
            f"| {row['arch']} | {row['path']} | {row['ms_b1']:.1f} | {row['ms_b16']:.1f} | "
            f"{eager['ms_b16'] / row['ms_b16']:.2f} | {row['max_dprob']:.4f} | "
            f"{row['flips']}/{16 * len(contexts[row['arch']]['spec'].class_names)} | {compile_s} |"
        )
    if not any(r["path"].startswith("ONNX") for r in all_rows):
        print("\nONNX Runtime: not measured (onnxruntime/onnx not importable).")
    if args.no_compile:
        print("torch.compile: not measured (--no-compile).")
    if args.int8 and data is not None:
        results["int8_check"] = {}
        for arch, context in contexts.items():
            check = int8_adoption(context, data)
            if check is None:
                print(f"\n{arch}: int8 adoption check needs a trained checkpoint (random weights)")
                continue
            results["int8_check"][arch] = check
            deltas = ", ".join(
                f"{name} {v['auroc_fp32']:.3f} -> {v['auroc_int8']:.3f}"
                for name, v in check["per_class"].items()
            )
            verdict = "ADOPT" if check["adopt"] else "do not adopt"
            print(
                f"\n{arch} int8 on the test split ({check['images']} images): AUROC {deltas}; "
                f"max |delta| {check['max_abs_auroc_delta']:.4f}; decisions flipped "
                f"{check['flips']}/{check['decisions']} ({check['flip_rate']:.1%}); "
                f"max |dprob| {check['max_abs_dprob']:.3f} -> {verdict} (rule: <= 0.01, <= 1 %)"
            )
    for arch in contexts:
        origin = contexts[arch]["origin"]
        ok = [
            r
            for r in all_rows
            if r["arch"] == arch
            and r["max_dprob"] <= TOLERANCE
            and r["flips"] == 0
            and r["path"] in MODE_OF_PATH
        ]
        fastest = min(ok, key=lambda r: r["ms_b16"])
        no_compile = min(
            (r for r in ok if not r["path"].startswith("compile")), key=lambda r: r["ms_b16"]
        )
        print(
            f"\n{arch} ({origin}): fastest path within {TOLERANCE} and without decision "
            f"flips: {fastest['path']}; "
            f"fastest without a compile step: {no_compile['path']}"
        )
        contexts[arch]["fastest"] = fastest["path"]
        contexts[arch]["fastest_no_compile"] = no_compile["path"]

    # 3. Predictor overhead
    print("\n## Predictor against the bare path (batch 16, same tensors; target >= 0.95)\n")
    print("| arch | path | Predictor mode | bare img/s | Predictor img/s | ratio |")
    print("|---|---|---|---|---|---|")
    results["predictor"] = []
    for arch, context in contexts.items():
        for path in dict.fromkeys([context["fastest"], context["fastest_no_compile"]]):
            row = bench_predictor(context, path, reps16 * 2)
            row["arch"] = arch
            results["predictor"].append(row)
            print(
                f"| {arch} | {path} | {row['mode']} | {row['bare_img_s']:.1f} | "
                f"{row['predictor_img_s']:.1f} | {row['ratio']:.2f} |"
            )
    for row in results["predictor"]:
        print_ratio(
            f"core {row['arch']} Predictor ({row['mode']}) / bare path, img/s at batch 16",
            row["predictor_img_s"],
            row["bare_img_s"],
            target=0.95,
        )

    # 4. Grad-CAM
    print("\n## Grad-CAM, one class, one image (target <= 3x one eager fp32 forward)\n")
    print("| arch | eager forward ms | Grad-CAM ms | ratio | explain() at source res |")
    print("|---|---|---|---|---|")
    results["cam"] = []
    for context in contexts.values():
        row = bench_cam(context, reps1, data)
        results["cam"].append(row)
        full = (
            f"{row['explain_full_res_ms']:.0f} ms ({row['full_res_shape']})"
            if "explain_full_res_ms" in row
            else "-"
        )
        print(
            f"| {row['arch']} | {row['forward_ms']:.1f} | {row['cam_ms']:.1f} | "
            f"{row['ratio']:.2f} | {full} |"
        )
    for row in results["cam"]:
        print_ratio(
            f"core {row['arch']} Grad-CAM / one eager forward, ms",
            row["cam_ms"],
            row["forward_ms"],
            target=3.0,
            lower=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
