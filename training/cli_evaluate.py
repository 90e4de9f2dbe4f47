"""``triage evaluate``: metrics.json, predictions.csv and plots for a checkpoint on a labelled set.

Every labelled image given is scored (an external set); no training configuration is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from triage_core.errors import CommandError, TriageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="checkpoint NAME")
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--labels", type=Path, required=True, help="NIH Data_Entry_2017.csv")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--split",
        choices=("all", "test", "val", "train"),
        default="all",
        help="all: every labelled image given (default). test/val/train: only for a checkpoint "
        "of the former single-split training, whose recorded split is rebuilt and checked "
        "against its fingerprint",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUROC CIs"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--cam-images", type=int, default=8, help="images in the Grad-CAM grid (0: none)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def _num(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def format_summary(metrics: dict[str, object]) -> str:
    """A few human-readable lines of ``metrics.json``."""
    lines = [
        f"{metrics['model']} on {metrics['split']} (n={metrics['images']}): "
        f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
        f"ECE {_num(metrics.get('ece_before'))} -> {_num(metrics.get('ece_after'))} "
        "(before -> after temperature scaling)"
    ]
    per_class = metrics["per_class"]
    assert isinstance(per_class, dict)
    for name, row in per_class.items():
        low, high = row["auroc_ci95"]
        auc = "n/a" if row["auroc"] is None else f"{row['auroc']:.3f}"
        ci = "" if low is None else f" [{low:.3f}, {high:.3f}]"
        lines.append(
            f"  {name:<13} AUROC {auc}{ci}  P {row['precision']:.3f}  R {row['recall']:.3f}  "
            f"F1 {row['f1']:.3f}  (n+={row['support']})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_checkpoint

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        metrics = evaluate_checkpoint(
            args.model,
            args.images,
            args.labels,
            args.out,
            split=args.split,
            batch_size=args.batch_size,
            n_boot=args.bootstrap,
            seed=args.seed,
            cam_images=args.cam_images,
        )
    except TriageError as exc:
        raise CommandError(str(exc), 2) from exc
    print(format_summary(metrics))
    print(f"wrote {args.out}/metrics.json, predictions.csv and plots")
    return 0
