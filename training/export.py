"""Export a trained checkpoint for shipping: fp16 weights, checked against fp32 on the test split.

``python -m training.export --model RUN/NAME --out triage_core/weights/NAME --images DIR
--labels CSV``

``python -m training.export --onnx --model NAME --check-images DIR [DIR...]`` writes only the
serving graph ``NAME.onnx`` beside an existing checkpoint (:mod:`training.onnx_export`: ONNX
Runtime checked against torch on those images; nothing is written when the check fails). The
fp16 export writes the graph too, checked on its test split.

The fp16 copy is kept only if its calibrated probabilities on the checkpoint's own test split
stay within ``--tolerance`` (default 0.01) of the fp32 model's and no class's AUROC moves by more
than ``--auroc-tolerance`` (default 0.01, the acceptance rule issue 8 sets for quantisation);
otherwise the export fails. The shipped fp16 file is then evaluated once on the test split
(:func:`training.evaluate.evaluate_checkpoint`, 1000 bootstrap resamples, seed 0) and those
metrics are written into its spec, with the out-of-distribution reference of
:mod:`triage_core.ood` (training-split features, validation-split threshold), so the spec, the
model card and a fresh evaluation of the shipped file agree exactly. The spec also records the
weights dtype and the fp16 check.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triage_core.errors import TriageError

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)


class ExportError(TriageError):
    """The fp16 export changed the model's outputs beyond the tolerance."""


def _test_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "split",
        "images",
        "accuracy",
        "macro_f1",
        "mean_auroc",
        "ece_before",
        "ece_after",
        "exact_match",
        "n_boot",
        "thresholds",
        "class_counts",
    )
    out = {k: metrics[k] for k in keep if k in metrics}
    out["per_class"] = {
        name: {
            k: row[k]
            for k in ("auroc", "auroc_ci95", "precision", "recall", "specificity", "f1", "support")
            if k in row
        }
        for name, row in metrics["per_class"].items()
    }
    return out


def ood_reference(
    model: torch.nn.Module, spec: ModelSpec, images: Path, labels: Path
) -> dict[str, Any]:
    """The out-of-distribution reference of :mod:`triage_core.ood`: feature statistics of the
    training split, threshold from the validation split (never the test split)."""
    from training.data import attach_images, index_images, load_tensors
    from training.evaluate import rebuild_split
    from triage_core import ood

    index = index_images(images)
    parts = {}
    for name in ("train", "val"):
        data = rebuild_split(spec, images, labels, name)
        _, paths = attach_images(data.records, index)
        parts[name] = load_tensors(paths, spec)
    model.eval()
    return ood.fit_reference(model, spec, parts["train"], parts["val"])


def export_fp16(
    model_path: Path,
    out: Path,
    images: Path,
    labels: Path,
    *,
    tolerance: float = 0.01,
    auroc_tolerance: float = 0.01,
    command: str | None = None,
    n_boot: int = 1000,
    eval_dir: Path | None = None,
) -> dict[str, Any]:
    """Write an fp16 copy of ``model_path`` at ``out``, evaluate it on the test split and record
    the metrics in its spec; returns the fp16 check's numbers."""
    import tempfile

    import torch
    from sklearn.metrics import roc_auc_score

    from training.calibrate import probabilities
    from training.data import attach_images, index_images, load_tensors
    from training.evaluate import evaluate_checkpoint, rebuild_split
    from training.predict import predict_logits
    from triage_core.models import load_checkpoint, save_checkpoint

    model, spec = load_checkpoint(model_path)
    data = rebuild_split(spec, images, labels, "test")
    _, paths = attach_images(data.records, index_images(images))
    tensors = load_tensors(paths, spec)
    p32 = probabilities(predict_logits(model, tensors), spec.task, spec.temperature)
    half = model.to(torch.float16).to(torch.float32)  # the round trip fp16 storage makes
    p16 = probabilities(predict_logits(half, tensors), spec.task, spec.temperature)
    y = data.multi_hot()
    auc_shift = 0.0
    for k in range(spec.num_classes):
        if 0 < y[:, k].sum() < len(y):
            auc_shift = max(
                auc_shift,
                abs(roc_auc_score(y[:, k], p32[:, k]) - roc_auc_score(y[:, k], p16[:, k])),
            )
    max_diff = float(np.abs(p32 - p16).max())
    check: dict[str, Any] = {
        "split": "test",
        "images": len(data),
        "max_abs_probability_difference": max_diff,
        "max_auroc_difference": float(auc_shift),
        "tolerance": tolerance,
        "auroc_tolerance": auroc_tolerance,
    }
    if max_diff > tolerance or auc_shift > auroc_tolerance:
        raise ExportError(f"fp16 weights change the outputs too much: {check}")
    training = dict(spec.training)
    training["weights_dtype"] = "float16"
    training["fp16_check"] = check
    training["run_checkpoint"] = str(model_path)
    if command:
        training["command"] = command
    spec = spec.replace(training=training, name=Path(out).name)
    spec = spec.replace(ood=ood_reference(half, spec, images, labels))
    save_checkpoint(half, spec, out, dtype=torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate_checkpoint(
            out,
            images,
            labels,
            eval_dir or Path(tmp),
            split="test",
            n_boot=n_boot,
            seed=0,
            cam_images=0,
        )
    shipped, _ = load_checkpoint(out)
    recorded = dict(spec.metrics)
    recorded["test"] = _test_summary(metrics)
    save_checkpoint(shipped, spec.replace(metrics=recorded), out, dtype=torch.float16)
    from training.onnx_export import MAX_CHECK_IMAGES, export_onnx

    check["onnx"] = export_onnx(out, tensors[:MAX_CHECK_IMAGES].float().numpy())
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="only write NAME.onnx beside the checkpoint --model (checked on --check-images)",
    )
    parser.add_argument(
        "--check-images",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="with --onnx: image files or folders for the ONNX Runtime vs torch check",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--labels", type=Path)
    parser.add_argument(
        "--eval-dir", type=Path, help="keep the shipped file's test evaluation (plots) here"
    )
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--auroc-tolerance", type=float, default=0.01)
    parser.add_argument("--command", help="replace the recorded training command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.onnx:
        return _main_onnx(parser, args)
    if args.out is None or args.images is None or args.labels is None:
        parser.error("the fp16 export needs --out, --images and --labels (or use --onnx)")
    try:
        check = export_fp16(
            args.model,
            args.out,
            args.images,
            args.labels,
            eval_dir=args.eval_dir,
            tolerance=args.tolerance,
            auroc_tolerance=args.auroc_tolerance,
            command=args.command,
        )
    except TriageError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(check, indent=2))
    return 0


def _main_onnx(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from training.onnx_export import check_inputs, export_onnx
    from triage_core.models import read_spec

    if not args.check_images:
        parser.error("--onnx needs --check-images PATH... (real images for the self-check)")
    try:
        inputs = check_inputs(args.check_images, read_spec(args.model))
        check = export_onnx(args.model, inputs)
    except TriageError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(check, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
