"""The pieces of a training run: loss, one epoch, validation, early stopping, the epoch loop,
and the resumable state file.

:func:`training.train.train` wires them together; each piece is small enough to test and to
read on its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triage_core.errors import TriageError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: File name of the resumable training state inside the output folder.
STATE_FILE = "last.pt"


class TrainingError(TriageError):
    """Training cannot start or continue (bad configuration, unusable resume state)."""


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
    """One pass over ``loader``: forward (bf16 autocast and channels_last on CUDA), loss,
    backward, AdamW step. Returns the mean training loss and the number of images seen.
    ``desc`` shows a tqdm bar (with ETA) under that title. ``step_scheduler`` is stepped after
    every optimizer step (a one-cycle schedule), ``ema`` (timm ``ModelEmaV3``) updated after
    it; ``freeze_bn`` keeps BatchNorm layers in eval mode (their statistics fixed)."""
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
            ema.update(net, step=_optimizer_steps(optimizer))
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


@dataclass
class EarlyStopping:
    """Keeps the best validation score, its epoch and a CPU copy of its weights; counts the
    epochs since the last improvement (an improvement must beat the best by ``min_delta``)."""

    patience: int
    min_delta: float = 1e-6
    best_score: float = -math.inf
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0

    def update(self, score: float, epoch: int, model: torch.nn.Module) -> bool:
        """Record epoch ``epoch``'s score; returns whether it improved on the best."""
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience


def validate(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: np.ndarray,
    task: str,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    use_cuda: bool = False,
) -> tuple[float, float]:
    """``(score, loss)`` on the validation tensors: the :func:`validation_score` (or minus the
    loss when no class has both labels) and the unweighted validation loss."""
    import torch
    import torch.nn.functional as F

    logits = predict_logits(
        model, images, batch_size=batch_size, device=device, channels_last=True, amp=use_cuda
    )
    y = torch.as_tensor(targets)
    z = torch.from_numpy(logits)
    loss = float(
        F.cross_entropy(z, y.long())
        if task == "multiclass"
        else F.binary_cross_entropy_with_logits(z, y.float())
    )
    score = validation_score(task, targets, logits)
    return (score if math.isfinite(score) else -loss), loss


@dataclass
class LoopState:
    """What the epoch loop carries from one epoch to the next (and across a resume)."""

    stopper: EarlyStopping
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0


def run_epochs(
    *,
    epochs: int,
    state: LoopState,
    run_epoch: Callable[[int], tuple[float, int, float]],
    evaluate: Callable[[], tuple[float, float]],
    step_schedule: Callable[[float], None],
    lr: Callable[[], float],
    model: torch.nn.Module,
    save: Callable[[int], None] | None = None,
    report: Callable[[str], None] | None = None,
    metric: str = "score",
    validate_start: bool = False,
) -> None:
    """The epoch loop: train one epoch, validate, step the schedule, track the best weights,
    save the resumable state, stop early.

    ``run_epoch(epoch)`` returns ``(mean loss, images seen, seconds)``; ``evaluate()`` returns
    the validation ``(score, loss)`` (on every rank in distributed runs); ``save(epoch)`` writes
    the state after each epoch; ``report`` prints one line per epoch (rank 0 only).
    ``validate_start`` also scores the starting weights (epoch 0, e.g. a linear-probe head on
    the pretrained backbone), so early stopping can keep them when fine-tuning does not help.
    """
    stopper = state.stopper
    if validate_start and state.start_epoch == 0 and not state.history:
        score, val_loss = evaluate()
        stopper.update(score, -1, model)
        stopper.stale = 0
        state.history.append(
            {"epoch": 0, "val_loss": round(val_loss, 5), "val_score": round(score, 5)}
        )
        if report is not None:
            report(f"epoch 0 (start): val loss {val_loss:.4f}, val {metric} {score:.4f} *")
    for epoch in range(state.start_epoch, epochs):
        started = time.perf_counter()
        train_loss, seen, train_seconds = run_epoch(epoch)
        score, val_loss = evaluate()
        step_schedule(score)
        improved = stopper.update(score, epoch, model)
        record = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "val_loss": round(val_loss, 5),
            "val_score": round(score, 5),
            "lr": lr(),
            "train_images_per_s": round(seen / max(train_seconds, 1e-9), 2),
            "seconds": round(time.perf_counter() - started, 2),
        }
        state.history.append(record)
        if report is not None:
            report(
                f"epoch {epoch + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                f"val {metric} {score:.4f}{' *' if improved else ''} ({record['seconds']} s)"
            )
        if save is not None:
            save(epoch)
        if stopper.should_stop and epoch + 1 < epochs:
            if report is not None:
                report(f"early stopping: no improvement for {stopper.stale} epochs")
            break


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


def classifier_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The final linear layer (timm ``get_classifier()``, torchvision ResNet ``fc``)."""
    import torch

    core = getattr(model, "module", model)
    getter = getattr(core, "get_classifier", None)
    layer = getter() if callable(getter) else getattr(core, "fc", None)
    if not isinstance(layer, torch.nn.Linear):
        raise TrainingError(f"no linear classifier found in {type(core).__name__}")
    return layer


def probe_head(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: np.ndarray,
    task: str,
    *,
    c: float = 0.1,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Start the classifier from a linear probe (the "LP" of LP-FT, Kumar et al. 2022).

    The pooled features of the (unaugmented) training images are computed once with the
    pretrained backbone in eval mode; an L2-regularised, class-balanced logistic regression
    (scikit-learn, deterministic lbfgs) is fitted per class (multilabel) or jointly
    (multiclass), and its weights become the classifier's. Fine-tuning then starts from a head
    that already fits the features, so the first large gradients of a random head do not wreck
    the pretrained features. Returns the probe's training-set mean AUROC.
    """
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    layer = classifier_layer(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        predict_logits(model, images, batch_size=batch_size, channels_last=True)
    finally:
        handle.remove()
    features = torch.cat(captured).float().numpy()
    weight = np.zeros(tuple(layer.weight.shape), dtype=np.float64)
    bias = np.zeros(layer.weight.shape[0], dtype=np.float64)
    if task == "multiclass":
        clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
        clf.fit(features, targets)
        weight[:], bias[:] = clf.coef_, clf.intercept_
        scores = clf.decision_function(features)
        y = np.eye(weight.shape[0])[np.asarray(targets, dtype=np.int64)]
    else:
        y = np.asarray(targets)
        scores = np.zeros_like(y, dtype=np.float64)
        for k in range(y.shape[1]):
            if not 0 < y[:, k].sum() < len(y):
                continue
            clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
            clf.fit(features, y[:, k])
            weight[k], bias[k] = clf.coef_[0], clf.intercept_[0]
            scores[:, k] = clf.decision_function(features)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight).to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(bias).to(layer.bias))
    aucs = [
        roc_auc_score(y[:, k], scores[:, k])
        for k in range(y.shape[1])
        if 0 < y[:, k].sum() < len(y)
    ]
    return {"c": c, "train_mean_auroc": float(np.mean(aucs)) if aucs else None}


#: What a resumed run must share with the run that saved its state.
RESUME_KEYS: tuple[str, ...] = ("arch", "task", "image_size", "seed", "extra_images")


def resume_state(
    resume: Path | None,
    patience: int,
    identity: Mapping[str, Any],
    fingerprint: str,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    show: bool,
) -> LoopState:
    """A fresh :class:`LoopState`, or the one saved in ``resume`` (model, optimizer, schedule
    and RNG restored), refused when its :data:`RESUME_KEYS` differ from ``identity`` (this run's
    settings) or it came from another split."""
    stopper = EarlyStopping(patience)
    if resume is None:
        return LoopState(stopper)
    state = load_training_state(resume)
    saved = state["config"]
    for key in RESUME_KEYS:
        if saved.get(key) != identity[key]:
            raise TrainingError(
                f"cannot resume from {resume}: it was trained with {key}="
                f"{saved.get(key)!r}, this run has {identity[key]!r}"
            )
    if state.get("split_fingerprint") != fingerprint:
        raise TrainingError(
            f"cannot resume from {resume}: the data split differs (other images, "
            "labels, split lists or seed)"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    start_epoch = int(state["epoch"])
    stopper.best_score = float(state["best_score"])
    stopper.best_epoch = int(state["best_epoch"])
    stopper.best_state = state["best_model"]
    stopper.stale = max(0, start_epoch - stopper.best_epoch - 1)
    _set_rng_state(state["rng"])
    if show:
        logger.info("resumed from %s at epoch %d", resume, start_epoch)
        print(f"resuming at epoch {start_epoch + 1} from {resume}", flush=True)
    return LoopState(stopper, json.loads(state["history"]), start_epoch)
