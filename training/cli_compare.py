"""``triage compare``: train and evaluate both architectures on one split; write report.md.

Both models see the same images, the same patient-wise split and the same seed; only the
architecture differs. Layout of ``--out``::

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

ARCHS: tuple[str, ...] = ("resnet18", "efficientnet_b0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_data_arguments(parser)
    parser.add_argument(
        "--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="architectures to compare"
    )
    parser.add_argument(
        "--pretrained-resnet18", type=Path, help="local ImageNet weights for resnet18"
    )
    parser.add_argument(
        "--pretrained-efficientnet-b0", type=Path, help="local ImageNet weights for EfficientNet"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip training for an architecture whose checkpoint already exists in OUT/<arch>",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--cam-images", type=int, default=8, help="Grad-CAM grid size (0: none)")


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from training.cli_train import config_from_args
    from training.data import format_split_summary
    from training.evaluate import evaluate_checkpoint
    from training.report import count_flops, cpu_ms_per_image, render_report
    from training.train import TrainConfig, train
    from triage_core.errors import TriageError
    from triage_core.models import checkpoint_paths, count_parameters, load_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrained = {
        "resnet18": args.pretrained_resnet18,
        "efficientnet_b0": args.pretrained_efficientnet_b0,
    }
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
        "initialisation": ", ".join(
            f"{a}: {pretrained[a] or 'random (no ImageNet weights)'}" for a in args.archs
        ),
        "CPU threads": torch.get_num_threads(),
        "command": "triage " + " ".join(sys.argv[1:]),
    }
    text = render_report(
        entries,
        title=f"cxr-triage: {' vs '.join(args.archs)} ({args.task})",
        setup=setup,
        split_table=split_table,
        class_names=list(entries[0]["metrics"]["per_class"]) if entries else [],
    )
    (out / "report.md").write_text(text)
    (out / "compare.json").write_text(
        json.dumps([{k: v for k, v in e.items()} for e in entries], indent=2, default=str) + "\n"
    )
    print(text)
    return 0
