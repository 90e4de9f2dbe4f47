"""Fit a triage model on NIH ChestX-ray14 and write a calibrated checkpoint.

One function, :func:`train`, driven by a :class:`TrainConfig` (the ``triage train`` flags):

* data: :mod:`training.data` (label file, task filter, patient-wise split, cached tensors made by
  ``triage_core.imaging``), seeded augmentation on the training split;
* model: ``triage_core.models.create_model`` (optionally from a local ImageNet weights file, or
  from an earlier checkpoint with ``init_from``, e.g. a low-resolution first stage);
* loss: class-weighted cross-entropy (multiclass) or BCE with ``pos_weight`` (multilabel);
* AdamW, cosine or plateau schedule, early stopping on validation macro-F1 (multiclass) or mean
  AUROC (multilabel);
* AMP (bfloat16) and channels_last on CUDA; DataLoader workers; a tqdm bar with ETA;
* a resumable ``last.pt`` (model, optimizer, scheduler, RNG, history, best weights) each epoch;
* multi-process data parallel under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl
  on CUDA);
* at the end (rank 0): the best epoch's weights are calibrated on validation
  (:mod:`training.calibrate`) and saved with ``triage_core.models.save_checkpoint``; the
  ``ModelSpec`` carries temperature, thresholds, a training summary and validation metrics.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data import Augment, CachedImageDataset, TaskData, load_tensors
from training.loop import (
    RESUME_KEYS,
    STATE_FILE,
    TrainingError,
    _Dist,
    _optimizer_steps,
    _resolve_device,
    _rng_state,
    _save_state,
    _setup_distributed,
    load_training_state,
    loss_function,
    predict_logits,
    probe_head,
    resume_state,
    run_epochs,
    seed_everything,
    train_epoch,
    validate,
    validation_score,
)
from training.splits import (
    Split,
    extra_training_data,
    format_split_summary,
    load_task_data,
    make_split,
    split_description,
    split_fingerprint,
    split_summary,
)

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)

SCHEDULES: tuple[str, ...] = ("cosine", "plateau")
#: How the classifier starts: random (the factory's), or fitted as a linear probe.
HEAD_INITS: tuple[str, ...] = ("random", "probe")

__all__ = [
    "STATE_FILE",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "load_task_data",
    "load_training_state",
    "loss_function",
    "make_split",
    "predict_logits",
    "train",
    "train_epoch",
    "validation_score",
]


@dataclass
class TrainConfig:
    """Everything ``triage train`` needs; see ``training/cli_train.py`` for the flag help."""

    images: Path
    labels: Path
    out: Path
    arch: str = "efficientnet_lite0"
    task: str = "multilabel"
    epochs: int = 15
    batch_size: int = 16
    image_size: int = 224
    pretrained: str | Path | None = None
    init_from: Path | None = None
    seed: int = 0
    split_seed: int | None = None
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    patience: int = 5
    workers: int = 0
    augment: bool = True
    head_init: str = "random"
    hflip: bool = False
    resume: Path | None = None
    train_val_list: Path | None = None
    test_list: Path | None = None
    extra_images: Path | None = None
    extra_labels: Path | None = None
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    sensitivity: float = 0.9
    max_images: int | None = None
    device: str = "auto"
    threads: int | None = None
    name: str = ""
    version: str = "1"
    fp16: bool = False
    progress: bool = True
    command: str = field(default_factory=lambda: shlex.join(["triage", *sys.argv[1:]]))

    @property
    def initial_weights(self) -> str | Path | None:
        """``"imagenet"``, a weights file, or ``None`` (random); ``pretrained=None`` means the
        architecture's default: ImageNet for ``efficientnet_lite0`` and ``efficientnet_b0`` (from
        the Lite0 tensors: it beat random initialisation on validation, 0.613 against 0.573
        mean AUROC at 128 px), random for ``resnet18`` (no ImageNet weights here)."""
        from triage_core.models import IMAGENET

        if self.pretrained is None:
            return IMAGENET if self.arch in ("efficientnet_lite0", "efficientnet_b0") else None
        if str(self.pretrained).lower() == "none":
            return None
        if str(self.pretrained) == IMAGENET:
            return IMAGENET
        return Path(self.pretrained)

    @property
    def data_seed(self) -> int:
        """Seed of the patient-wise split (``split_seed``, else ``seed``)."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out

    def validate(self) -> None:
        from triage_core.models import ARCHITECTURES
        from triage_core.spec import TASKS

        if self.arch not in ARCHITECTURES:
            raise TrainingError(f"--arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.task not in TASKS:
            raise TrainingError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 1")
        if not 32 <= self.image_size <= 2048:
            raise TrainingError(f"--image-size must be in [32, 2048], got {self.image_size}")
        if self.workers < 0:
            raise TrainingError("--workers must be >= 0")
        if (self.train_val_list is None) != (self.test_list is None):
            raise TrainingError("--train-val-list and --test-list go together")
        if (self.extra_images is None) != (self.extra_labels is None):
            raise TrainingError("--extra-images and --extra-labels go together")
        if self.head_init not in HEAD_INITS:
            raise TrainingError(f"--head-init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if not self.lr > 0:
            raise TrainingError(f"--lr must be positive, got {self.lr}")


@dataclass
class TrainResult:
    """What :func:`train` produced (on rank 0; other ranks get ``checkpoint=None``)."""

    checkpoint: Path | None
    spec: ModelSpec | None
    history: list[dict[str, Any]]
    best_epoch: int
    start_epoch: int
    optimizer_steps: int
    seconds: float


# --------------------------------------------------------------------------------------------
# helpers


@dataclass
class _Prepared:
    """Data of one run: the task data, its split, cached tensors and the training dataset."""

    data: TaskData
    split: Split
    summary: dict[str, dict[str, int]]
    val_data: TaskData
    val_images: torch.Tensor
    train_set: CachedImageDataset
    train_targets: np.ndarray
    extra_info: dict[str, Any] | None


def prepare_data(config: TrainConfig, spec: ModelSpec, show: bool) -> _Prepared:
    """Labels, patient-wise split, decoded and cached tensors (``show``: print the split and
    progress bars), optional training-only extra images, and the augmented training set."""
    import torch

    data, index = load_task_data(
        config.images, config.labels, config.task, config.max_images, config.data_seed
    )
    split = make_split(data, config)
    summary = split_summary(data, split)
    if show:
        print(f"task {config.task}: {len(data)} images", flush=True)
        print(format_split_summary(summary), flush=True)
    train_data, val_data = data.subset(split.train), data.subset(split.val)
    train_paths = [index[r.image_index] for r in train_data.records]
    val_paths = [index[r.image_index] for r in val_data.records]
    bars = config.progress and show
    train_images = load_tensors(train_paths, spec, progress=bars)
    val_images = load_tensors(val_paths, spec, progress=bars)
    train_targets = train_data.targets
    extra_info: dict[str, Any] | None = None
    if config.extra_images is not None and config.extra_labels is not None:
        extra, extra_paths, extra_info = extra_training_data(config, data, split, spec.input_size)
        if show:
            print(f"extra training images: {extra_info}", flush=True)
        train_images = torch.cat([train_images, load_tensors(extra_paths, spec, progress=bars)])
        train_targets = np.concatenate([train_targets, extra.targets])
    augment = Augment(hflip=config.hflip) if config.augment else None
    train_set = CachedImageDataset(
        train_images, train_targets, spec, augment=augment, seed=config.seed
    )
    return _Prepared(
        data, split, summary, val_data, val_images, train_set, train_targets, extra_info
    )


def build_model(config: TrainConfig, num_classes: int, device: str) -> torch.nn.Module:
    """The network: from ``init_from``'s checkpoint, else from the configured initial weights;
    on ``device``, channels_last."""
    import torch

    from triage_core.models import create_model, load_checkpoint

    if config.init_from is not None:
        model, init_spec = load_checkpoint(config.init_from)
        if init_spec.arch != config.arch or init_spec.task != config.task:
            raise TrainingError(
                f"--init-from {config.init_from} is {init_spec.arch}/{init_spec.task}, "
                f"not {config.arch}/{config.task}"
            )
        model.train()
    else:
        model = create_model(config.arch, num_classes, pretrained=config.initial_weights)
    model.to(device)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> tuple[Any, Any]:
    """AdamW and its schedule (cosine to 1 % of ``lr``, or reduce-on-plateau of the score)."""
    import torch

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler: Any
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs, eta_min=config.lr * 0.01
        )
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.3, patience=max(1, config.patience // 2)
        )
    return optimizer, scheduler


def _distributed_validate(
    dist_info: _Dist, evaluate: Callable[[], tuple[float, float]]
) -> tuple[float, float]:
    """Validation on rank 0, its ``(score, loss)`` broadcast to every rank."""
    import torch

    decision = list(evaluate()) if dist_info.main else [0.0, 0.0]
    if dist_info.enabled:
        import torch.distributed as tdist

        box = torch.tensor(decision, dtype=torch.float64)
        tdist.broadcast(box, src=0)
        decision = box.tolist()
    return decision[0], decision[1]


def train(config: TrainConfig) -> TrainResult:
    """Train, calibrate and save; see the module docstring.

    Raises
    ------
    TrainingError, DatasetError, CheckpointError
        Bad configuration, unusable data, unusable resume state or pretrained weights.
    """
    import torch

    from triage_core.models import default_spec

    started = time.perf_counter()
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    dist_info = _setup_distributed(_resolve_device(config.device))
    device = _resolve_device(config.device, dist_info)
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(torch.device(device))
    seed_everything(config.seed)  # the same on every rank: identical initial weights

    spec = default_spec(config.arch, config.task, config.initial_weights).replace(
        input_size=config.image_size,
        name=config.name or f"cxr-triage-{config.arch}-{config.task}",
        version=config.version,
    )
    prep = prepare_data(config, spec, show=dist_info.main)
    model = build_model(config, spec.num_classes, device)
    probe: dict[str, Any] | None = None
    if config.head_init == "probe" and config.resume is None and config.init_from is None:
        probe = probe_head(model, prep.train_set.images, prep.train_targets, config.task)
        if dist_info.main:
            print(f"linear-probe head: {probe}", flush=True)
    criterion = loss_function(config.task, prep.train_targets, spec.num_classes).to(device)
    optimizer, scheduler = build_optimizer(config, model)
    fingerprint = split_fingerprint(prep.data, prep.split)
    identity = {key: getattr(config, key) for key in RESUME_KEYS}
    loop = resume_state(
        config.resume,
        config.patience,
        identity,
        fingerprint,
        model,
        optimizer,
        scheduler,
        dist_info.main,
    )

    net: torch.nn.Module = model
    sampler: Any = None
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        net = DistributedDataParallel(model, device_ids=[device] if use_cuda else None)
        sampler = DistributedSampler(
            prep.train_set,  # type: ignore[arg-type]
            num_replicas=dist_info.world,
            rank=dist_info.rank,
            shuffle=True,
            seed=config.seed,
        )
    loader_gen = torch.Generator().manual_seed(config.seed)
    loader: Any = torch.utils.data.DataLoader(
        prep.train_set,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
        pin_memory=use_cuda,
        drop_last=len(prep.train_set) > config.batch_size * dist_info.world,
        generator=loader_gen,
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    show = config.progress and dist_info.main

    def run_epoch(epoch: int) -> tuple[float, int, float]:
        prep.train_set.set_epoch(epoch)
        loader_gen.manual_seed(config.seed * 1000 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        begun = time.perf_counter()
        loss, seen = train_epoch(
            net,
            loader,
            criterion,
            optimizer,
            task=config.task,
            device=device,
            use_cuda=use_cuda,
            desc=f"epoch {epoch + 1}/{config.epochs}" if show else None,
        )
        return loss, seen, time.perf_counter() - begun

    def evaluate() -> tuple[float, float]:
        return validate(
            model,
            prep.val_images,
            prep.val_data.targets,
            config.task,
            batch_size=max(config.batch_size, 32),
            device=device,
            use_cuda=use_cuda,
        )

    def step_schedule(score: float) -> None:
        scheduler.step() if config.schedule == "cosine" else scheduler.step(score)

    def save(epoch: int) -> None:
        stopper = loop.stopper
        _save_state(
            out / STATE_FILE,
            {
                "format": "cxr-triage-train-state",
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best_score": stopper.best_score,
                "best_epoch": stopper.best_epoch,
                "best_model": stopper.best_state,
                "history": json.dumps(loop.history),
                "rng": _rng_state(),
                "config": config.to_dict(),
                "split_fingerprint": fingerprint,
            },
        )

    run_epochs(
        epochs=config.epochs,
        state=loop,
        run_epoch=run_epoch,
        evaluate=lambda: _distributed_validate(dist_info, evaluate),
        step_schedule=step_schedule,
        lr=lambda: float(optimizer.param_groups[0]["lr"]),
        model=model,
        save=save if dist_info.main else None,
        report=(lambda line: print(line, flush=True)) if dist_info.main else None,
        metric="macro-F1" if config.task == "multiclass" else "mean AUROC",
        validate_start=probe is not None,
    )

    checkpoint: Path | None = None
    final_spec: ModelSpec | None = None
    best_epoch = loop.stopper.best_epoch
    if dist_info.main:
        if loop.stopper.best_state is not None:
            model.load_state_dict(loop.stopper.best_state)
        checkpoint, final_spec = _calibrate_and_save(
            model, spec, config, prep, loop.history, best_epoch, device, use_cuda, started
        )
    if dist_info.enabled:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return TrainResult(
        checkpoint=checkpoint,
        spec=final_spec,
        history=loop.history,
        best_epoch=best_epoch + 1,
        start_epoch=loop.start_epoch,
        optimizer_steps=_optimizer_steps(optimizer),
        seconds=time.perf_counter() - started,
    )


def _calibrate_and_save(
    model: torch.nn.Module,
    spec: ModelSpec,
    config: TrainConfig,
    prep: _Prepared,
    history: Sequence[Mapping[str, Any]],
    best_epoch: int,
    device: str,
    use_cuda: bool,
    started: float,
) -> tuple[Path, ModelSpec]:
    import torch

    from training.calibrate import (
        choose_thresholds,
        expected_calibration_error,
        fit_temperature,
        probabilities,
    )
    from triage_core import __version__
    from triage_core.models import pretrained_source, save_checkpoint

    val_data, data, split = prep.val_data, prep.data, prep.split
    summary, extra_info = prep.summary, prep.extra_info
    val_logits = predict_logits(
        model, prep.val_images, batch_size=32, device=device, channels_last=True, amp=use_cuda
    )
    temperature = fit_temperature(val_logits, val_data.targets, config.task)
    probs_raw = probabilities(val_logits, config.task, 1.0)
    probs = probabilities(val_logits, config.task, temperature)
    thresholds, threshold_info = choose_thresholds(
        probs, val_data.multi_hot(), spec.class_names, config.sensitivity
    )
    metrics = {
        "split": "val",
        "score_name": "macro_f1" if config.task == "multiclass" else "mean_auroc",
        "score": validation_score(config.task, val_data.targets, val_logits),
        "ece_before": expected_calibration_error(probs_raw, val_data.targets, config.task),
        "ece_after": expected_calibration_error(probs, val_data.targets, config.task),
        "thresholds": threshold_info,
    }
    training = {
        "data": {
            "images": str(config.images),
            "labels": str(config.labels),
            "task_images": len(data),
            "split": split_description(config, data, split),
            "counts": {k: dict(v) for k, v in summary.items()},
            "extra_train": dict(extra_info) if extra_info else None,
        },
        "epochs_run": sum(1 for h in history if h.get("epoch", 1) > 0),
        "epochs_max": config.epochs,
        "best_epoch": best_epoch + 1,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "schedule": config.schedule,
        "augment": asdict(Augment(hflip=config.hflip)) if config.augment else None,
        "head_init": config.head_init,
        "pretrained": pretrained_source(config.arch, config.initial_weights),
        "init_from": str(config.init_from) if config.init_from else None,
        "device": device,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "torch": torch.__version__,
        "command": config.command,
        "seconds": round(time.perf_counter() - started, 1),
        "history": list(history),
    }
    final = spec.replace(
        temperature=float(temperature),
        thresholds=list(thresholds),
        training=training,
        metrics=metrics,
        code_version=__version__,
    )
    name = Path(config.out) / (config.name or f"cxr-triage-{config.arch}-{config.task}")
    path = save_checkpoint(model, final, name, dtype=torch.float16 if config.fp16 else None)
    from training.onnx_export import export_after_training

    export_after_training(path, prep.val_images)  # NAME.onnx, the serving graph (issue 15)
    print(
        f"saved {path} (best epoch {best_epoch + 1}, val {metrics['score_name']} "
        f"{metrics['score']:.4f}, temperature {temperature:.3f}, thresholds "
        f"{[round(t, 3) for t in thresholds]})",
        flush=True,
    )
    return path, final
