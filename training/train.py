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
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data import (
    Augment,
    CachedImageDataset,
    Split,
    TaskData,
    attach_images,
    check_patient_disjoint,
    format_split_summary,
    index_images,
    load_tensors,
    official_split,
    patient_split,
    read_labels,
    select_task,
    split_fingerprint,
    split_summary,
)
from triage_core.errors import TriageError

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)

SCHEDULES: tuple[str, ...] = ("cosine", "plateau")
#: File name of the resumable training state inside the output folder.
STATE_FILE = "last.pt"


class TrainingError(TriageError):
    """Training cannot start or continue (bad configuration, unusable resume state)."""


@dataclass
class TrainConfig:
    """Everything ``triage train`` needs; see ``training/cli_train.py`` for the flag help."""

    images: Path
    labels: Path
    out: Path
    arch: str = "efficientnet_b0"
    task: str = "multilabel"
    epochs: int = 15
    batch_size: int = 16
    image_size: int = 224
    pretrained: Path | None = None
    init_from: Path | None = None
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    patience: int = 5
    workers: int = 0
    augment: bool = True
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
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _setup_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    info = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    logger.info("distributed: rank %d of %d (%s)", info.rank, info.world, backend)
    return info


def _resolve_device(requested: str, dist: _Dist | None = None) -> str:
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda requested but CUDA is not available")
        if dist is not None and dist.enabled and requested == "cuda":
            requested = f"cuda:{dist.local_rank}"
    return requested


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def loss_function(task: str, train_targets: np.ndarray, num_classes: int) -> torch.nn.Module:
    """Class-weighted cross-entropy (multiclass) or BCE with ``pos_weight`` (multilabel).

    Multiclass weights are ``N / (C * n_c)``; multilabel ``pos_weight`` is ``n_neg / n_pos``
    per class, clipped to [1, 20] (a class without positives gets 1).
    """
    import torch

    if task == "multiclass":
        counts = np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=num_classes)
        weights = len(train_targets) / (num_classes * np.maximum(counts, 1))
        return torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    y = np.asarray(train_targets, dtype=np.float64)
    pos = y.sum(axis=0)
    neg = len(y) - pos
    pos_weight = np.where(pos > 0, np.clip(neg / np.maximum(pos, 1), 1.0, 20.0), 1.0)
    return torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32))


def validation_score(task: str, targets: np.ndarray, logits: np.ndarray) -> float:
    """Early-stopping score: macro-F1 (multiclass) or mean AUROC over classes (multilabel).

    Classes whose validation labels are all 0 or all 1 are left out of the AUROC mean; NaN when
    none is computable.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    if task == "multiclass":
        return float(
            f1_score(
                targets,
                logits.argmax(axis=1),
                average="macro",
                labels=range(logits.shape[1]),
                zero_division=0,
            )
        )
    aucs = []
    for c in range(logits.shape[1]):
        y = targets[:, c]
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, logits[:, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    channels_last: bool = False,
    amp: bool = False,
) -> np.ndarray:
    """Logits ``(N, C)`` for cached tensors, in eval mode, batched, without gradients."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device, torch.float32)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            outs.append(out.float().cpu())
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outs).numpy()


def make_split(data: TaskData, config: TrainConfig) -> Split:
    """The configured split (official lists or seeded 60/20/20), checked patient-disjoint."""
    if config.train_val_list is not None and config.test_list is not None:
        split = official_split(data, config.train_val_list, config.test_list, seed=config.seed)
    else:
        split = patient_split(data, seed=config.seed, fractions=config.split_fractions)
    check_patient_disjoint(data, split)
    return split


def load_task_data(
    images: Path, labels: Path, task: str, max_images: int | None = None, seed: int = 0
) -> tuple[TaskData, dict[str, Path]]:
    """Labels joined with the images present, filtered to ``task``.

    ``max_images`` (for smoke runs) keeps a seeded random subset of whole patients.
    """
    records = read_labels(labels)
    index = index_images(images)
    kept, _ = attach_images(records, index)
    data = select_task(kept, task)
    if max_images is not None and max_images < len(data):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(data))
        data = data.subset(np.sort(order[:max_images]))
    return data, index


def extra_training_data(
    config: TrainConfig, data: TaskData, split: Split, input_size: int
) -> tuple[TaskData, list[Path], dict[str, Any]]:
    """Training-only images from another folder (e.g. NIH images kept only at 64 px).

    Images of patients in the validation or test split, and images already in ``data``, are
    left out, so the extra data can never leak into evaluation. Images smaller than the input
    size are counted and logged (they are upsampled by ``to_tensor``).
    """
    from PIL import Image, UnidentifiedImageError

    assert config.extra_images is not None and config.extra_labels is not None
    records = read_labels(config.extra_labels)
    kept, paths = attach_images(records, index_images(config.extra_images))
    extra = select_task(kept, config.task)
    by_name = dict(zip((r.image_index for r in kept), paths, strict=True))
    held_out = {data.records[int(i)].patient_id for i in (*split.val, *split.test)}
    known = {r.image_index for r in data.records}
    keep = [
        i
        for i, r in enumerate(extra.records)
        if r.patient_id not in held_out and r.image_index not in known
    ]
    if not keep:
        raise TrainingError(
            f"no usable extra training image in {config.extra_images} (all belong to "
            "validation/test patients or duplicate the main images)"
        )
    chosen = extra.subset(keep)
    chosen_paths = [by_name[r.image_index] for r in chosen.records]
    small = 0
    for path in chosen_paths:
        try:
            with Image.open(path) as img:
                small += int(min(img.size) < input_size)
        except (OSError, UnidentifiedImageError):
            continue  # not a raster file (DICOM): load_tensors reads it properly
    if small:
        logger.warning(
            "%d extra training images are smaller than %d px and are upsampled",
            small,
            input_size,
        )
    info = {
        "images": str(config.extra_images),
        "labels": str(config.extra_labels),
        "used": len(chosen),
        "left_out_heldout_patients": sum(1 for r in extra.records if r.patient_id in held_out),
        "left_out_duplicates": sum(1 for r in extra.records if r.image_index in known),
        "smaller_than_input": small,
        "counts": chosen.class_counts(),
    }
    return chosen, chosen_paths, info


def split_description(config: TrainConfig, data: TaskData, split: Split) -> dict[str, Any]:
    """What ``triage evaluate`` needs to rebuild the same split from the same files."""
    return {
        "method": split.method,
        "seed": split.seed,
        "fractions": list(config.split_fractions),
        "train_val_list": str(config.train_val_list) if config.train_val_list else None,
        "test_list": str(config.test_list) if config.test_list else None,
        "max_images": config.max_images,
        "fingerprint": split_fingerprint(data, split),
        "sizes": split.sizes(),
    }


def _rng_state() -> dict[str, Any]:
    import torch

    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": json.dumps(random.getstate()),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def _save_state(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a ``last.pt`` written by :func:`train` (tensors and plain types only, no pickle
    of arbitrary objects: ``torch.load(weights_only=True)``)."""
    import pickle

    import torch

    if not path.is_file():
        raise TrainingError(f"resume state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"{path}: not a readable training state ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != "cxr-triage-train-state":
        raise TrainingError(f"{path}: not a cxr-triage training state")
    return state


# --------------------------------------------------------------------------------------------
# the training loop


def train(config: TrainConfig) -> TrainResult:
    """Train, calibrate and save; see the module docstring.

    Raises
    ------
    TrainingError, DatasetError, CheckpointError
        Bad configuration, unusable data, unusable resume state or pretrained weights.
    """
    import torch
    import torch.nn.functional as F

    from triage_core.models import create_model, default_spec, load_checkpoint

    started = time.perf_counter()
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = _resolve_device(config.device)
    dist_info = _setup_distributed(device)
    device = _resolve_device(config.device, dist_info)
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(torch.device(device))
    seed_everything(config.seed)  # the same on every rank: identical initial weights

    spec = default_spec(config.arch, config.task).replace(
        input_size=config.image_size,
        name=config.name or f"cxr-triage-{config.arch}-{config.task}",
        version=config.version,
    )
    data, index = load_task_data(
        config.images, config.labels, config.task, config.max_images, config.seed
    )
    split = make_split(data, config)
    summary = split_summary(data, split)
    if dist_info.main:
        print(f"task {config.task}: {len(data)} images", flush=True)
        print(format_split_summary(summary), flush=True)
    train_data, val_data = data.subset(split.train), data.subset(split.val)
    train_paths = [index[r.image_index] for r in train_data.records]
    val_paths = [index[r.image_index] for r in val_data.records]
    show = config.progress and dist_info.main
    train_images = load_tensors(train_paths, spec, progress=show)
    val_images = load_tensors(val_paths, spec, progress=show)
    train_targets = train_data.targets
    extra_info: dict[str, Any] | None = None
    if config.extra_images is not None and config.extra_labels is not None:
        extra, extra_paths, extra_info = extra_training_data(config, data, split, spec.input_size)
        if dist_info.main:
            print(f"extra training images: {extra_info}", flush=True)
        train_images = torch.cat([train_images, load_tensors(extra_paths, spec, progress=show)])
        train_targets = np.concatenate([train_targets, extra.targets])

    augment = Augment(hflip=config.hflip) if config.augment else None
    train_set = CachedImageDataset(
        train_images, train_targets, spec, augment=augment, seed=config.seed
    )

    # model
    if config.init_from is not None:
        model, init_spec = load_checkpoint(config.init_from)
        if init_spec.arch != config.arch or init_spec.task != config.task:
            raise TrainingError(
                f"--init-from {config.init_from} is {init_spec.arch}/{init_spec.task}, "
                f"not {config.arch}/{config.task}"
            )
        model.train()
    else:
        model = create_model(config.arch, spec.num_classes, pretrained=config.pretrained)
    model.to(device)
    if use_cuda:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    criterion = loss_function(config.task, train_targets, spec.num_classes).to(device)
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

    history: list[dict[str, Any]] = []
    start_epoch = 0
    best_score = -math.inf
    best_epoch = -1
    best_state: dict[str, torch.Tensor] | None = None
    if config.resume is not None:
        state = load_training_state(config.resume)
        saved = state["config"]
        for key in ("arch", "task", "image_size", "seed", "extra_images"):
            if saved.get(key) != getattr(config, key):
                raise TrainingError(
                    f"cannot resume from {config.resume}: it was trained with {key}="
                    f"{saved.get(key)!r}, this run has {getattr(config, key)!r}"
                )
        if state.get("split_fingerprint") != split_fingerprint(data, split):
            raise TrainingError(
                f"cannot resume from {config.resume}: the data split differs (other images, "
                "labels, split lists or seed)"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        best_score = float(state["best_score"])
        best_epoch = int(state["best_epoch"])
        best_state = state["best_model"]
        history = json.loads(state["history"])
        _set_rng_state(state["rng"])
        if dist_info.main:
            logger.info("resumed from %s at epoch %d", config.resume, start_epoch)
            print(f"resuming at epoch {start_epoch + 1} from {config.resume}", flush=True)

    net: torch.nn.Module = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if use_cuda else None)
    sampler: Any = None
    if dist_info.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(
            train_set,  # type: ignore[arg-type]
            num_replicas=dist_info.world,
            rank=dist_info.rank,
            shuffle=True,
            seed=config.seed,
        )
    loader_gen = torch.Generator().manual_seed(config.seed)
    loader: Any = torch.utils.data.DataLoader(
        train_set,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
        pin_memory=use_cuda,
        drop_last=len(train_set) > config.batch_size * dist_info.world,
        generator=loader_gen,
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    stale = 0
    if history:
        stale = sum(1 for _ in range(best_epoch + 1, start_epoch))
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        train_set.set_epoch(epoch)
        loader_gen.manual_seed(config.seed * 1000 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_started = time.perf_counter()
        train_loss, seen = train_epoch(
            net,
            loader,
            criterion,
            optimizer,
            task=config.task,
            device=device,
            use_cuda=use_cuda,
            desc=f"epoch {epoch + 1}/{config.epochs}" if show else None,
        )
        train_seconds = time.perf_counter() - train_started

        # validation on rank 0, decision broadcast to every rank
        decision = [0.0, 0.0]
        if dist_info.main:
            val_logits = predict_logits(
                model,
                val_images,
                batch_size=max(config.batch_size, 32),
                device=device,
                channels_last=use_cuda,
                amp=use_cuda,
            )
            y_val = torch.as_tensor(val_data.targets)
            z = torch.from_numpy(val_logits)
            val_loss = float(
                F.cross_entropy(z, y_val.long())
                if config.task == "multiclass"
                else F.binary_cross_entropy_with_logits(z, y_val.float())
            )
            score = validation_score(config.task, val_data.targets, val_logits)
            decision = [score if math.isfinite(score) else -val_loss, val_loss]
        if dist_info.enabled:
            import torch.distributed as tdist

            box = torch.tensor(decision, dtype=torch.float64)
            tdist.broadcast(box, src=0)
            decision = box.tolist()
        score, val_loss = decision
        if config.schedule == "cosine":
            scheduler.step()
        else:
            scheduler.step(score)
        improved = score > best_score + 1e-6
        if improved:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        record = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "val_loss": round(val_loss, 5),
            "val_score": round(score, 5),
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": round(seen / max(train_seconds, 1e-9), 2),
            "seconds": round(time.perf_counter() - epoch_started, 2),
        }
        history.append(record)
        if dist_info.main:
            metric = "macro-F1" if config.task == "multiclass" else "mean AUROC"
            print(
                f"epoch {epoch + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                f"val {metric} {score:.4f}{' *' if improved else ''} ({record['seconds']} s)",
                flush=True,
            )
            _save_state(
                state_path,
                {
                    "format": "cxr-triage-train-state",
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "best_model": best_state,
                    "history": json.dumps(history),
                    "rng": _rng_state(),
                    "config": config.to_dict(),
                    "split_fingerprint": split_fingerprint(data, split),
                },
            )
        if stale >= config.patience and epoch + 1 < config.epochs:
            if dist_info.main:
                print(f"early stopping: no improvement for {stale} epochs", flush=True)
            break

    steps = _optimizer_steps(optimizer)
    checkpoint: Path | None = None
    final_spec: ModelSpec | None = None
    if dist_info.main:
        if best_state is not None:
            model.load_state_dict(best_state)
        checkpoint, final_spec = _calibrate_and_save(
            model,
            spec,
            config,
            data,
            split,
            summary,
            val_images,
            val_data,
            history,
            best_epoch,
            device,
            use_cuda,
            started,
        )
    if dist_info.enabled:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return TrainResult(
        checkpoint=checkpoint,
        spec=final_spec,
        history=history,
        best_epoch=best_epoch + 1,
        start_epoch=start_epoch,
        optimizer_steps=steps,
        seconds=time.perf_counter() - started,
    )


def train_epoch(
    net: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    task: str,
    device: str = "cpu",
    use_cuda: bool = False,
    desc: str | None = None,
) -> tuple[float, int]:
    """One pass over ``loader``: forward (bf16 autocast and channels_last on CUDA), loss,
    backward, AdamW step. Returns the mean training loss and the number of images seen.
    ``desc`` shows a tqdm bar (with ETA) under that title."""
    import torch

    net.train()
    total, seen = 0.0, 0
    bar: Any = loader
    if desc is not None:
        from tqdm import tqdm

        bar = tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True)
    for x, y in bar:
        x = x.to(device, non_blocking=True)
        if use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda):
            logits = net(x)
        loss = criterion(logits.float(), y if task == "multiclass" else y.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(x)
        seen += len(x)
        if desc is not None:
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
    return total / max(seen, 1), seen


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        step = state.get("step")
        if step is not None:
            return int(step)
    return 0


def _calibrate_and_save(
    model: torch.nn.Module,
    spec: ModelSpec,
    config: TrainConfig,
    data: TaskData,
    split: Split,
    summary: Mapping[str, Mapping[str, int]],
    val_images: torch.Tensor,
    val_data: TaskData,
    history: Sequence[Mapping[str, Any]],
    best_epoch: int,
    device: str,
    use_cuda: bool,
    started: float,
    extra_info: Mapping[str, Any] | None = None,
) -> tuple[Path, ModelSpec]:
    import torch

    from training.calibrate import (
        choose_thresholds,
        expected_calibration_error,
        fit_temperature,
        probabilities,
    )
    from triage_core import __version__
    from triage_core.models import save_checkpoint

    val_logits = predict_logits(
        model, val_images, batch_size=32, device=device, channels_last=use_cuda, amp=use_cuda
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
        "epochs_run": len(history),
        "epochs_max": config.epochs,
        "best_epoch": best_epoch + 1,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "schedule": config.schedule,
        "augment": asdict(Augment(hflip=config.hflip)) if config.augment else None,
        "pretrained": str(config.pretrained) if config.pretrained else None,
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
    print(
        f"saved {path} (best epoch {best_epoch + 1}, val {metrics['score_name']} "
        f"{metrics['score']:.4f}, temperature {temperature:.3f}, thresholds "
        f"{[round(t, 3) for t in thresholds]})",
        flush=True,
    )
    return path, final
