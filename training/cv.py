"""Patient-wise K-fold cross-validation: the protocol every recipe choice is made on.

Why this exists: the shared data (a few thousand NIH images) is far too small for a single
train/validation/test split to tell recipes apart. Here every labelled image is predicted
exactly once, by the model of the fold that did not see its patient, and a recipe is judged on
those pooled out-of-fold (OOF) predictions with intervals that resample patients
(:mod:`training.oof`).

* folds: scikit-learn's ``StratifiedGroupKFold`` (groups = patients, strata = the combination
  of the findings), seeded;
* one :class:`~training.recipe.Recipe` per run (either task), fitted per fold by the one fit
  loop :func:`training.fit.fit` (fixed epochs, optional DDP under ``torchrun``);
* per fold, for free: OOF logits after every epoch, of the EMA weights, and with horizontal-flip
  test-time augmentation, so those choices are read off the same run;
* resumable: a finished fold is skipped on rerun, an interrupted one continues from its train
  state at its last finished epoch. The files are those of :mod:`training.runs`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training import distributed, oof
from training.data import (
    TaskData,
    degrade_resolution,
    degraded_choice,
    load_tensors,
    with_degraded,
)
from training.fit import fit
from training.predict import flip_tta_logits, predict_logits
from training.recipe import Recipe, Source, TrainingError
from training.runs import CVRun, relative_data_path
from training.sources import ExtraData, load_extra
from training.splits import load_task_data

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class CVConfig:
    """``triage train --cv K``: the data, the recipe, the folds and where to write."""

    images: Path
    labels: Path
    out: Path
    recipe: Recipe
    folds: int = 5
    fold_seed: int = 0
    only_folds: tuple[int, ...] | None = None
    threads: int | None = None
    progress: bool = True
    max_images: int | None = None
    command: str = ""
    sources: tuple[Source, ...] = ()
    device: str = "cpu"
    workers: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise TrainingError(f"--cv must be >= 2, got {self.folds}")
        if self.workers < 0:
            raise TrainingError(f"--workers must be >= 0, got {self.workers}")
        if self.only_folds is not None and not set(self.only_folds) <= set(range(self.folds)):
            raise TrainingError(f"--folds must name folds in 0..{self.folds - 1}")


def patient_folds(data: TaskData, k: int, seed: int) -> np.ndarray:
    """Fold index per image: patient-wise (``StratifiedGroupKFold``), stratified on the
    combination of findings, seeded. Every patient's images share one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise TrainingError(f"--cv must be >= 2, got {k}")
    y = data.multi_hot().astype(int)
    strata = (y * (2 ** np.arange(y.shape[1]))).sum(axis=1)
    groups = np.asarray([r.patient_id for r in data.records])
    if len(np.unique(groups)) < k:
        raise TrainingError(f"{len(np.unique(groups))} patients cannot fill {k} folds")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(data), -1, dtype=np.int64)
    for i, (_, held_out) in enumerate(splitter.split(np.zeros(len(y)), strata, groups)):
        fold[held_out] = i
    for patient in np.unique(groups):
        if len(np.unique(fold[groups == patient])) != 1:  # pragma: no cover - sklearn's promise
            raise TrainingError(f"patient {patient} spans folds")
    return fold


def parse_folds(text: str | None, k: int) -> tuple[int, ...] | None:
    """``--folds 0,2`` -> ``(0, 2)`` (``None``: all)."""
    if not text:
        return None
    try:
        chosen = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as exc:
        raise TrainingError(f"--folds takes comma-separated fold numbers, got {text!r}") from exc
    if not chosen or min(chosen) < 0 or max(chosen) >= k:
        raise TrainingError(f"--folds must name folds in 0..{k - 1}, got {text!r}")
    return chosen


def _fingerprint(names: Sequence[str], k: int) -> str:
    """Hash of fold ``k``'s training image names (checked when its state is resumed)."""
    digest = hashlib.sha256(f"fold{k}\n".encode())
    for name in names:
        digest.update(name.encode() + b"\n")
    return digest.hexdigest()[:16]


@dataclass
class _Data:
    """The run's images, decoded once, with their folds, the extra sources, and the rows shown
    at low resolution in training (``degraded``, sorted; their tensors ``low``)."""

    data: TaskData
    fold: np.ndarray
    tensors: torch.Tensor
    patients: np.ndarray
    extra: ExtraData | None
    degraded: np.ndarray
    low: torch.Tensor | None


def _fit_fold(config: CVConfig, run: CVRun, d: _Data, k: int, device: str) -> None:
    """Fit fold ``k`` and (rank 0) write its checkpoints and held-out predictions."""
    import torch

    from triage_core.models import save_checkpoint

    recipe, dist = config.recipe, distributed.current()
    held = np.flatnonzero(d.fold == k)
    train_idx = np.flatnonzero(d.fold != k)
    held_images = tensors_of(d.tensors, held)
    train_images = with_degraded(d.tensors, train_idx, d.degraded, d.low)
    train_targets = d.data.targets[train_idx]
    weights = np.ones(len(train_idx))
    names = [d.data.records[i].image_index for i in train_idx]
    if d.extra is not None:  # training-only images; none of a held-out patient
        use = d.extra.usable(set(d.patients[held].tolist()))
        train_images = torch.cat([train_images, tensors_of(d.extra.tensors, use)])
        train_targets = np.concatenate([train_targets, d.extra.targets[use]])
        weights = np.concatenate([weights, d.extra.weights[use]])
        names += [f"extra:{i}" for i in use]
    amp = device.startswith("cuda")
    per_epoch: dict[str, np.ndarray] = {}

    def record(epoch: int, model: torch.nn.Module) -> None:
        # an interrupted fold resumes its weights, but the per-epoch snapshots before the
        # interruption are lost; they are only informative, the final variants are complete
        if dist.main:
            per_epoch[f"epoch{epoch}"] = predict_logits(
                model, held_images, channels_last=True, device=device, amp=amp
            )

    begun = time.perf_counter()
    spec = recipe.spec()
    result = fit(
        recipe,
        train_images,
        train_targets,
        spec,
        state_path=run.fold_state(k),
        fingerprint=_fingerprint(names, k),
        on_epoch=record,
        progress=config.progress,
        desc=f"fold {k + 1}/{config.folds}",
        sample_weights=weights,
        device=device,
        workers=config.workers,
    )
    if not dist.main:
        return
    variants = {
        "final": predict_logits(
            result.model, held_images, channels_last=True, device=device, amp=amp
        ),
        "final_tta": flip_tta_logits(result.model, held_images, device=device, amp=amp),
        **per_epoch,
    }
    fold_spec = spec.replace(
        name=f"fold{k}",
        training={"recipe": recipe.to_dict(), "fold": k, "history": result.history},
    )
    save_checkpoint(result.model, fold_spec, run.fold_dir(k) / "model", dtype=torch.float16)
    if result.ema is not None:
        variants["ema"] = predict_logits(
            result.ema, held_images, channels_last=True, device=device, amp=amp
        )
        variants["ema_tta"] = flip_tta_logits(result.ema, held_images, device=device, amp=amp)
        save_checkpoint(result.ema, fold_spec, run.fold_dir(k) / "model_ema", dtype=torch.float16)
    seconds = time.perf_counter() - begun
    run.save_fold(k, held, seconds, variants)
    print(f"fold {k + 1}/{config.folds} done in {seconds:.0f} s", flush=True)


def tensors_of(tensors: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """The rows ``index`` of cached tensors."""
    import torch

    return tensors[torch.from_numpy(np.asarray(index, dtype=np.int64))]


def _summary(config: CVConfig, run: CVRun, d: _Data, started: float) -> dict[str, Any]:
    """The ``cv.json`` content: pooled OOF table, data provenance, timings."""
    data, fold, recipe = d.data, d.fold, config.recipe
    pooled, seconds = run.pool(len(data), config.folds)
    run.write_oof(data, fold, pooled)
    patients = [r.patient_id for r in data.records]
    counts = data.class_counts()
    extra = d.extra
    return {
        "data": {
            "images": len(data),
            "patients": len(set(patients)),
            "positives": {name: counts[name] for name in data.class_names},
            "none_of_the_findings": counts.get("none"),
            "per_fold_images": [int((fold == k).sum()) for k in range(config.folds)],
        },
        "class_names": list(data.class_names),
        "task": recipe.task,
        "fold_seconds": seconds,
        "variants": oof.score_variants(recipe.task, data.multi_hot(), patients, pooled),
        "recipe": recipe.to_dict(),
        "folds": config.folds,
        "fold_seed": config.fold_seed,
        "images": relative_data_path(config.images),
        "labels": relative_data_path(config.labels),
        "max_images": config.max_images,
        "command": config.command,
        "world_size": distributed.current().world,
        "sources": extra.counts if extra is not None else [],
        "degraded_to_64px": int(len(d.degraded)),
        "extra_images_per_fold": [
            len(extra.usable(set(d.patients[fold == k].tolist()))) for k in range(config.folds)
        ]
        if extra is not None
        else [],
        "session_seconds": round(time.perf_counter() - started, 1),
    }


def run_cv(config: CVConfig) -> dict[str, Any]:
    """Run (or resume) a whole cross-validation; returns the ``cv.json`` content.

    Under ``torchrun`` every rank fits every fold together (DDP); rank 0 alone writes.

    Raises
    ------
    TrainingError
        Bad folds, a resume on other folds or another recipe, or a fold left unfinished
        (``only_folds``) when the pooled table is built.
    """
    import torch

    recipe = config.recipe
    if config.threads:
        torch.set_num_threads(config.threads)
    device = distributed.resolve_device(config.device)
    dist = distributed.setup(device)
    started = time.perf_counter()
    if recipe.init_from is not None:
        logger.warning(
            "--init-from %s: its training images are not checked against the held-out folds; "
            "out-of-fold scores are optimistic if it saw them",
            recipe.init_from,
        )
    data, index = load_task_data(
        config.images, config.labels, recipe.task, config.max_images, config.fold_seed
    )
    fold = patient_folds(data, config.folds, config.fold_seed)
    run = CVRun(Path(config.out))
    if dist.main:
        run.record_folds(data, fold)
    distributed.barrier()
    run.record_folds(data, fold)  # every rank checks the folds it is about to train
    spec = recipe.spec()
    paths = [index[r.image_index] for r in data.records]
    tensors = load_tensors(paths, spec, progress=config.progress and dist.main)
    extra = load_extra(config.sources, {r.image_index for r in data.records}, spec, recipe.task)
    degraded = degraded_choice(len(data), recipe.degrade64, recipe.seed)
    low = (
        load_tensors([paths[i] for i in degraded], spec, transform=degrade_resolution)
        if len(degraded)
        else None
    )
    patients = np.asarray([r.patient_id for r in data.records])
    d = _Data(data, fold, tensors, patients, extra, degraded, low)
    todo = config.only_folds if config.only_folds is not None else range(config.folds)
    for k in todo:
        if run.fold_done(k):
            logger.info("fold %d already done", k)
            continue
        run.fold_dir(k).mkdir(parents=True, exist_ok=True)
        _fit_fold(config, run, d, k, device)
        distributed.barrier()
    summary: dict[str, Any] = {}
    if dist.main:
        summary = _summary(config, run, d, started)
        run.write_summary(summary)
        print(oof.format_table(summary["variants"], data.class_names, str(run.root)), flush=True)
    distributed.teardown()
    return summary


__all__: Sequence[str] = ("CVConfig", "parse_folds", "patient_folds", "run_cv", "tensors_of")
