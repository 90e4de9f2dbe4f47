"""The one fit loop: a model of a :class:`~training.recipe.Recipe` fitted on cached tensors.

Every model of the project is fitted here, the folds of a cross-validation
(:mod:`training.cv`) and the shipped model (:mod:`training.final`):

* model: ``triage_core.models.create_model`` from the recipe's initial weights, or the weights
  of an earlier checkpoint (``init_from``); optionally a linear-probe head first;
* loss: BCE with ``pos_weight`` (multilabel) or class-weighted cross-entropy (multiclass);
* AdamW and a one-cycle schedule stepped per batch; EMA of the weights (timm ``ModelEmaV3``);
* a fixed number of epochs (no early stopping: there is no held-out data to stop on); the
  data order and augmentation are functions of ``(seed, epoch)`` only, so a resumed run gives
  the same weights as an uninterrupted one;
* one train-state file (:mod:`training.state`) written after every epoch and resumed;
* data parallel under ``torchrun`` (:mod:`training.distributed`): DistributedDataParallel with
  a DistributedSampler; every rank ends with the same weights, rank 0 writes the state.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training import distributed
from training.data import CachedImageDataset
from training.predict import probe_head
from training.recipe import Recipe, TrainingError
from training.state import (
    check_resumable,
    load_state,
    optimizer_steps,
    recipe_key,
    rng_state,
    save_state,
    set_rng_state,
)

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit` produced: the final weights, their EMA (``None`` without EMA), one
    history entry per epoch, the epoch it started at (after a resume) and the optimizer steps."""

    model: torch.nn.Module
    ema: torch.nn.Module | None
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    optimizer_steps: int = 0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def loss_function(
    task: str, train_targets: np.ndarray, num_classes: int, weighted: bool = True
) -> torch.nn.Module:
    """Class-weighted cross-entropy (multiclass) or BCE with ``pos_weight`` (multilabel).

    Multiclass weights are ``N / (C * n_c)``; multilabel ``pos_weight`` is ``n_neg / n_pos``
    per class, clipped to [1, 20] (a class without positives gets 1). ``weighted=False``: the
    plain losses.
    """
    import torch

    if task == "multiclass":
        if not weighted:
            return torch.nn.CrossEntropyLoss()
        counts = np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=num_classes)
        weights = len(train_targets) / (num_classes * np.maximum(counts, 1))
        return torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    if not weighted:
        return torch.nn.BCEWithLogitsLoss()
    y = np.asarray(train_targets, dtype=np.float64)
    pos = y.sum(axis=0)
    neg = len(y) - pos
    pos_weight = np.where(pos > 0, np.clip(neg / np.maximum(pos, 1), 1.0, 20.0), 1.0)
    return torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32))


def build_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The network of ``recipe``: from ``init_from``'s checkpoint (same architecture, task and
    classes, refused otherwise), else from the recipe's initial weights."""
    from triage_core.models import create_model, load_checkpoint

    if recipe.init_from is None:
        return create_model(recipe.arch, num_classes, pretrained=recipe.initial_weights())
    model, spec = load_checkpoint(recipe.init_from)
    if (spec.arch, spec.task) != (recipe.arch, recipe.task):
        raise TrainingError(
            f"--init-from {recipe.init_from} is {spec.arch}/{spec.task}, "
            f"not {recipe.arch}/{recipe.task}"
        )
    return model.float().train()


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
    step_scheduler: Any = None,
    ema: Any = None,
    freeze_bn: bool = False,
) -> tuple[float, int]:
    """One pass over ``loader``: forward (bf16 autocast on CUDA, channels_last), loss,
    backward, AdamW step. Returns the mean training loss and the number of images seen.

    ``desc`` shows a tqdm bar under that title; ``step_scheduler`` is stepped after every
    optimizer step (the one-cycle schedule), ``ema`` (timm ``ModelEmaV3``) updated after it;
    ``freeze_bn`` keeps BatchNorm layers in eval mode (their statistics fixed).
    """
    import torch

    net.train()
    if freeze_bn:
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    total, seen = 0.0, 0
    bar: Any = loader
    if desc is not None:
        from tqdm import tqdm

        bar = tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True)
    for x, y in bar:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda):
            logits = net(x)
        loss = criterion(logits.float(), y if task == "multiclass" else y.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        if ema is not None:  # the optimizer's step count drives the EMA's warm-up
            ema.update(getattr(net, "module", net), step=optimizer_steps(optimizer))
        total += float(loss.detach()) * len(x)
        seen += len(x)
        if desc is not None:
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
    return total / max(seen, 1), seen


def _loader(
    recipe: Recipe,
    dataset: CachedImageDataset,
    sample_weights: np.ndarray | None,
    dist: distributed.Dist,
    use_cuda: bool,
    workers: int = 0,
) -> tuple[Any, Callable[[int], None]]:
    """The training DataLoader and the per-epoch reseed of its order."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

    generator = torch.Generator().manual_seed(recipe.seed)
    weighted = sample_weights is not None and not np.all(sample_weights == sample_weights[0])
    sampler: Any = None
    if weighted and dist.enabled:
        raise TrainingError(
            "source weights other than 1 are not supported with torchrun (a weighted sampler "
            "is not split across processes); give every --source weight 1 or run one process"
        )
    if weighted:
        assert sample_weights is not None
        sampler = WeightedRandomSampler(
            sample_weights.astype(float).tolist(),
            num_samples=len(dataset),
            replacement=True,
            generator=generator,
        )
    elif dist.enabled:
        sampler = DistributedSampler(
            dataset,  # type: ignore[arg-type]
            num_replicas=dist.world,
            rank=dist.rank,
            shuffle=True,
            seed=recipe.seed,
        )
    loader: Any = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=recipe.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset) > recipe.batch_size * dist.world,
        generator=generator if sampler is None or weighted else None,
        pin_memory=use_cuda,
        num_workers=workers,  # not persistent: each epoch's workers see set_epoch's epoch
    )

    def reseed(epoch: int) -> None:
        dataset.set_epoch(epoch)
        generator.manual_seed(recipe.seed * 1000 + epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)

    return loader, reseed


def _share_rank0_state(model: torch.nn.Module, ema: Any) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, which DDP does not
    average: each rank's last forward updated them from its own batch) and rank 0's EMA, so
    that all ranks hold the weights rank 0 saves."""
    import torch.distributed as tdist

    tensors = list(model.buffers())
    if ema is not None:
        tensors += list(ema.module.state_dict().values())
    for tensor in tensors:
        tdist.broadcast(tensor, src=0)


def fit(
    recipe: Recipe,
    images: torch.Tensor,
    targets: np.ndarray,
    spec: ModelSpec,
    *,
    state_path: Path | None = None,
    fingerprint: str = "",
    on_epoch: Callable[[int, torch.nn.Module], None] | None = None,
    progress: bool = False,
    desc: str = "",
    sample_weights: np.ndarray | None = None,
    device: str = "cpu",
    workers: int = 0,
) -> FitResult:
    """Fit one model of ``recipe`` on cached tensors for exactly ``recipe.epochs`` epochs.

    Parameters
    ----------
    images, targets : torch.Tensor, numpy.ndarray
        Training tensors (:func:`training.data.load_tensors`) and the task's targets.
    spec : ModelSpec
        :meth:`Recipe.spec` (normalisation for the augmentation, number of classes).
    state_path : pathlib.Path, optional
        Saved after every epoch (rank 0); an existing state of the same recipe, data
        ``fingerprint`` and number of processes is resumed.
    on_epoch : callable, optional
        ``on_epoch(epoch, model)`` after every finished epoch (1-based; 0 for a probe head), on
        every rank, e.g. to record held-out logits.
    sample_weights : numpy.ndarray, optional
        Per-image sampling weights (a weighted sampler with replacement when they differ).
    device, workers : str, int
        Where to train (``cuda`` adds bf16 autocast) and the DataLoader worker processes;
        neither changes the result (augmentation is a function of seed, epoch and index).

    Raises
    ------
    TrainingError
        An unusable resume state, or an ``init_from`` of another architecture or task.
    """
    import torch
    from timm.utils import ModelEmaV3

    dist = distributed.current()
    use_cuda = device.startswith("cuda")
    seed_everything(recipe.seed)  # the same on every rank: identical initial weights
    model = build_model(recipe, spec.num_classes).to(device)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if recipe.head_init == "probe":  # deterministic: the same head on a resume, on every rank
        probe_head(model, images, targets, recipe.task, c=recipe.probe_c)
        if on_epoch is not None:
            on_epoch(0, model)
    if recipe.epochs == 0:
        return FitResult(model, None)
    dataset = CachedImageDataset(images, targets, spec, recipe.augment(), seed=recipe.seed)
    loader, reseed = _loader(recipe, dataset, sample_weights, dist, use_cuda, workers)
    criterion = loss_function(recipe.task, targets, spec.num_classes, recipe.pos_weight)
    criterion = criterion.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=recipe.lr,
        total_steps=max(1, recipe.epochs * len(loader)),
        pct_start=recipe.warmup,
        div_factor=25.0,
    )
    ema = ModelEmaV3(model, decay=recipe.ema, use_warmup=True) if recipe.ema else None
    history: list[dict[str, Any]] = []
    start = 0
    if state_path is not None and state_path.is_file():
        state = load_state(state_path)
        check_resumable(state, state_path, recipe, fingerprint, dist.world)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        history = json.loads(state["history"])
        start = int(state["epoch"])
        logger.info("resuming %s at epoch %d", state_path, start + 1)
    net: torch.nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if use_cuda else None)
    show = progress and dist.main
    for epoch in range(start, recipe.epochs):
        reseed(epoch)
        begun = time.perf_counter()
        loss, seen = train_epoch(
            net,
            loader,
            criterion,
            optimizer,
            task=recipe.task,
            device=device,
            use_cuda=use_cuda,
            desc=f"{desc} epoch {epoch + 1}" if show else None,
            step_scheduler=scheduler,
            ema=ema,
            freeze_bn=recipe.freeze_bn,
        )
        if dist.enabled:
            _share_rank0_state(model, ema)
        seconds = time.perf_counter() - begun
        entry = {
            "epoch": epoch + 1,
            "train_loss": round(loss, 5),
            "images": seen * dist.world,
            "seconds": round(seconds, 1),
            "train_images_per_s": round(seen * dist.world / max(seconds, 1e-9), 2),
            "lr_end": float(optimizer.param_groups[0]["lr"]),
        }
        history.append(entry)
        if state_path is not None and dist.main:
            save_state(
                state_path,
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else {},
                    "rng": rng_state(),
                    "history": json.dumps(history),
                    "recipe": recipe_key(recipe),
                    "fingerprint": fingerprint,
                    "world_size": dist.world,
                },
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
        if show:
            print(f"{desc} epoch {epoch + 1}/{recipe.epochs}: {entry}", flush=True)
    return FitResult(
        model,
        ema.module if ema is not None else None,
        history,
        start_epoch=start,
        optimizer_steps=optimizer_steps(optimizer),
    )


__all__ = ["FitResult", "build_model", "fit", "loss_function", "seed_everything", "train_epoch"]
