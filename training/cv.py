"""Patient-wise K-fold cross-validation: the protocol every recipe choice is made on.

Why this exists: the shared data (643 NIH images at 256 px) is far too small for a single
train/validation/test split to tell recipes apart (a 117-image validation split has 11-16
positives per class, and one fine-tuning run varies by several AUROC points). Here every
labelled image is predicted exactly once, by the model of the fold that did not see its
patient, and a recipe is judged on those pooled out-of-fold (OOF) predictions with intervals
that resample patients (:mod:`training.oof`).

* folds: scikit-learn's ``StratifiedGroupKFold`` (groups = patients, strata = the combination
  of the three findings), seeded;
* one :class:`Recipe` per run: fixed epoch count (no early stopping: there is no held-out data
  to stop on), AdamW, one-cycle schedule (warm-up from ``lr / 25``), BCE with ``pos_weight``,
  random resized crop, optional EMA of the weights (timm ``ModelEmaV3``);
* per fold, for free: OOF logits after every epoch, of the EMA weights, and with horizontal-flip
  test-time augmentation, so those choices are read off the same run;
* resumable: a finished fold leaves ``fold{k}/predictions.npz`` (skipped on rerun), an
  interrupted one continues from ``fold{k}/state.pt`` at its last finished epoch.

Outputs in ``OUT``: ``folds.csv`` (image, patient, fold), ``fold{k}/`` (fp16 checkpoint,
predictions), ``oof.csv`` (labels and every variant's OOF logits), ``cv.json`` (recipe, data,
timings, the OOF table).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data import Augment, CachedImageDataset, TaskData, load_tensors
from training.loop import (
    TrainingError,
    _rng_state,
    _save_state,
    _set_rng_state,
    load_training_state,
    loss_function,
    predict_logits,
    probe_head,
    seed_everything,
    train_epoch,
)
from training.splits import load_task_data

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)

#: File a finished fold leaves behind (its presence means "done, skip on resume").
FOLD_DONE = "predictions.npz"
#: Resumable state of an unfinished fold.
FOLD_STATE = "state.pt"


@dataclass(frozen=True)
class Recipe:
    """How one model is fitted; identical for every fold and for the shipped model.

    ``crop`` is the random resized crop's side range as a fraction of the input (``None``: the
    older affine + intensity augmentation of :class:`training.data.Augment`); ``ema`` the EMA
    decay (0: no EMA); ``warmup`` the one-cycle schedule's warm-up fraction of the steps;
    ``head_init`` ``"probe"`` starts the classifier as a linear probe on the pretrained
    features (LP-FT; with ``epochs = 0`` the model *is* the linear probe); ``normalisation``
    ``"imagenet"`` feeds ImageNet mean/std instead of the initial weights' own; ``freeze_bn``
    keeps the BatchNorm statistics of the initial weights while fine-tuning (batches of 16);
    ``probe_c`` is the probe's inverse L2 strength (scikit-learn ``C``).
    """

    arch: str = "efficientnet_lite0"
    image_size: int = 224
    epochs: int = 8
    batch_size: int = 16
    lr: float = 3e-4
    warmup: float = 0.3
    weight_decay: float = 1e-4
    crop: tuple[float, float] | None = (0.875, 1.0)
    hflip: bool = False
    pos_weight: bool = True
    ema: float = 0.998
    pretrained: str = "imagenet"
    seed: int = 0
    head_init: str = "random"
    normalisation: str = "default"
    freeze_bn: bool = False
    probe_c: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["crop"] = list(self.crop) if self.crop else None
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainingError(f"unknown recipe fields {unknown}")
        values = dict(raw)
        if values.get("crop") is not None:
            values["crop"] = tuple(values["crop"])
        return cls(**values)

    def augment(self) -> Augment:
        if self.crop is None:
            return Augment(hflip=self.hflip)
        return Augment.crop_only(self.crop, hflip=self.hflip)

    def validate(self) -> None:
        from triage_core.models import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise TrainingError(f"--arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.epochs < (0 if self.head_init == "probe" else 1) or self.batch_size < 1:
            raise TrainingError("--epochs (0 only with a probe head) and --batch-size: >= 1")
        if self.head_init not in ("random", "probe"):
            raise TrainingError(f"--head-init must be random or probe, got {self.head_init!r}")
        if self.normalisation not in ("default", "imagenet"):
            raise TrainingError(f"normalisation must be default or imagenet: {self.normalisation}")
        if not 32 <= self.image_size <= 2048:
            raise TrainingError(f"--image-size must be in [32, 2048], got {self.image_size}")
        if not self.lr > 0 or not 0 < self.warmup < 1:
            raise TrainingError("--lr must be positive and --warmup in (0, 1)")
        if not 0 <= self.ema < 1:
            raise TrainingError(f"--ema must be in [0, 1), got {self.ema}")
        if self.crop is not None and not 0.3 <= self.crop[0] <= self.crop[1] <= 1.0:
            raise TrainingError(f"--crop must satisfy 0.3 <= low <= high <= 1, got {self.crop}")


@dataclass(frozen=True)
class Source:
    """A training-only image/label source beside the main data (NIH ``Data_Entry_2017``
    columns): e.g. the 64 px NIH images, or a site's reader-confirmed export
    (``triage feedback export``). ``weight`` is its sampling weight per image relative to the
    main data's 1."""

    images: Path
    labels: Path
    weight: float = 1.0

    def describe(self) -> dict[str, Any]:
        from training.oof import relative_data_path

        return {
            "images": relative_data_path(self.images),
            "labels": relative_data_path(self.labels),
            "weight": self.weight,
        }

    @classmethod
    def parse(cls, text: str) -> Source:
        """``IMAGES,LABELS[,WEIGHT]`` (the ``--source`` flag)."""
        parts = text.split(",")
        if len(parts) not in (2, 3):
            raise TrainingError(f"--source takes IMAGES,LABELS[,WEIGHT], got {text!r}")
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError as exc:
            raise TrainingError(f"--source weight must be a number, got {parts[2]!r}") from exc
        if not weight > 0:
            raise TrainingError(f"--source weight must be positive, got {weight}")
        return cls(Path(parts[0]), Path(parts[1]), weight)


@dataclass
class ExtraData:
    """The images of every extra source, decoded once: tensors, targets, patients, weights."""

    tensors: torch.Tensor
    targets: np.ndarray
    patients: np.ndarray
    weights: np.ndarray
    counts: list[dict[str, Any]]

    def usable(self, excluded_patients: set[str]) -> np.ndarray:
        """Indices of the extra images whose patient is not in ``excluded_patients``."""
        return np.asarray(
            [i for i, p in enumerate(self.patients) if p not in excluded_patients],
            dtype=np.int64,
        )


def load_extra(sources: Sequence[Source], known: set[str], spec: ModelSpec) -> ExtraData | None:
    """Decode every extra source (images already in the main data are left out)."""
    import torch

    if not sources:
        return None
    parts, targets, patients, weights, counts = [], [], [], [], []
    for source in sources:
        data, index = load_task_data(source.images, source.labels, "multilabel")
        keep = [i for i, r in enumerate(data.records) if r.image_index not in known]
        data = data.subset(keep)
        parts.append(load_tensors([index[r.image_index] for r in data.records], spec))
        targets.append(data.multi_hot())
        patients += [r.patient_id for r in data.records]
        weights += [source.weight] * len(data)
        counts.append(
            {
                **source.describe(),
                "n_images": len(data),
                "patients": len({r.patient_id for r in data.records}),
                "positives": data.class_counts(),
            }
        )
    return ExtraData(
        torch.cat(parts),
        np.concatenate(targets),
        np.asarray(patients),
        np.asarray(weights, dtype=np.float64),
        counts,
    )


@dataclass
class CVConfig:
    """``triage train --cv K``: the data, the recipe, the folds and where to write."""

    images: Path
    labels: Path
    out: Path
    recipe: Recipe = field(default_factory=Recipe)
    folds: int = 5
    fold_seed: int = 0
    only_folds: tuple[int, ...] | None = None
    threads: int | None = None
    progress: bool = True
    max_images: int | None = None
    command: str = ""
    sources: tuple[Source, ...] = ()


# --------------------------------------------------------------------------------------------
# folds


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


# --------------------------------------------------------------------------------------------
# fitting one model


def recipe_spec(recipe: Recipe, task: str = "multilabel") -> ModelSpec:
    """The spec of a fresh model of ``recipe`` (input size and normalisation)."""
    from triage_core.models import default_spec
    from triage_core.spec import IMAGENET_MEAN, IMAGENET_STD

    spec = default_spec(recipe.arch, task, initial_weights(recipe)).replace(
        input_size=recipe.image_size
    )
    if recipe.normalisation == "imagenet":
        spec = spec.replace(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return spec


def initial_weights(recipe: Recipe) -> str | Path | None:
    from triage_core.models import IMAGENET

    if recipe.pretrained.lower() == "none":
        return None
    return IMAGENET if recipe.pretrained == IMAGENET else Path(recipe.pretrained)


def flip_tta_logits(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Mean of the logits of the images and of their horizontal mirror images."""
    plain = predict_logits(model, images, channels_last=True)
    mirrored = predict_logits(model, images.flip(-1), channels_last=True)
    return (plain + mirrored) / 2


def fit(
    recipe: Recipe,
    images: torch.Tensor,
    targets: np.ndarray,
    spec: ModelSpec,
    *,
    state_path: Path | None = None,
    on_epoch: Callable[[int, torch.nn.Module], None] | None = None,
    progress: bool = False,
    desc: str = "",
    sample_weights: np.ndarray | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None, list[dict[str, Any]]]:
    """Fit one model of ``recipe`` on cached tensors, for exactly ``recipe.epochs`` epochs.

    Returns ``(model, ema_model or None, history)``. With ``state_path`` the state is saved
    after every epoch and an existing state (same recipe) is resumed. ``on_epoch(epoch,
    model)`` runs after every finished epoch (1-based), e.g. to record held-out logits.
    """
    import torch
    from timm.utils import ModelEmaV3

    from triage_core.models import create_model

    recipe.validate()
    seed_everything(recipe.seed)
    model = create_model(recipe.arch, spec.num_classes, pretrained=initial_weights(recipe))
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if recipe.head_init == "probe":  # deterministic: the same head on a resume
        probe_head(model, images, targets, "multilabel", c=recipe.probe_c)
        if on_epoch is not None:
            on_epoch(0, model)
    if recipe.epochs == 0:
        return model, None, []
    dataset = CachedImageDataset(images, targets, spec, recipe.augment(), seed=recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    sampler: Any = None
    if sample_weights is not None and not np.all(sample_weights == sample_weights[0]):
        sampler = torch.utils.data.WeightedRandomSampler(
            sample_weights.astype(float).tolist(),
            num_samples=len(dataset),
            replacement=True,
            generator=generator,
        )
    loader: Any = torch.utils.data.DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=recipe.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset) > recipe.batch_size,
        generator=generator if sampler is None else None,
    )
    criterion: torch.nn.Module = (
        loss_function("multilabel", targets, spec.num_classes)
        if recipe.pos_weight
        else torch.nn.BCEWithLogitsLoss()
    )
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
        state = load_training_state(state_path)
        if state.get("recipe") != json.dumps(recipe.to_dict(), sort_keys=True):
            raise TrainingError(f"{state_path} was written by another recipe; remove it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        history = json.loads(state["history"])
        start = int(state["epoch"])
        logger.info("resuming %s at epoch %d", state_path, start + 1)

    for epoch in range(start, recipe.epochs):
        dataset.set_epoch(epoch)
        generator.manual_seed(recipe.seed * 1000 + epoch)
        begun = time.perf_counter()
        loss, seen = train_epoch(
            model,
            loader,
            criterion,
            optimizer,
            task="multilabel",
            desc=f"{desc} epoch {epoch + 1}" if progress else None,
            step_scheduler=scheduler,
            ema=ema,
            freeze_bn=recipe.freeze_bn,
        )
        entry = {
            "epoch": epoch + 1,
            "train_loss": round(loss, 5),
            "images": seen,
            "seconds": round(time.perf_counter() - begun, 1),
            "lr_end": float(optimizer.param_groups[0]["lr"]),
        }
        history.append(entry)
        if state_path is not None:
            _save_state(
                state_path,
                {
                    "format": "cxr-triage-train-state",
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else {},
                    "rng": _rng_state(),
                    "history": json.dumps(history),
                    "recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                },
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
        if progress:
            print(f"{desc} epoch {epoch + 1}/{recipe.epochs}: {entry}", flush=True)
    return model, (ema.module if ema is not None else None), history


# --------------------------------------------------------------------------------------------
# the cross-validation run


def _write_folds(path: Path, data: TaskData, fold: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Patient ID", "fold"])
        for record, f in zip(data.records, fold, strict=True):
            writer.writerow([record.image_index, record.patient_id, int(f)])
    tmp.replace(path)


def _check_folds(path: Path, data: TaskData, fold: np.ndarray) -> None:
    """A resumed run must see the same images in the same folds."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    saved = [(r["Image Index"], int(r["fold"])) for r in rows]
    now = [(r.image_index, int(f)) for r, f in zip(data.records, fold, strict=True)]
    if saved != now:
        raise TrainingError(f"{path} holds other folds (different images or seed); use a new --out")


def run_cv(config: CVConfig) -> dict[str, Any]:
    """Run (or resume) a whole cross-validation; returns the ``cv.json`` content."""
    import torch

    from training import oof
    from triage_core.models import save_checkpoint

    recipe = config.recipe
    recipe.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    data, index = load_task_data(
        config.images, config.labels, "multilabel", config.max_images, config.fold_seed
    )
    fold = patient_folds(data, config.folds, config.fold_seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    folds_csv = out / "folds.csv"
    if folds_csv.exists():
        _check_folds(folds_csv, data, fold)
    else:
        _write_folds(folds_csv, data, fold)
    spec = recipe_spec(recipe)
    paths = [index[r.image_index] for r in data.records]
    tensors = load_tensors(paths, spec, progress=config.progress)
    targets = data.multi_hot()
    extra = load_extra(config.sources, {r.image_index for r in data.records}, spec)
    patients = np.asarray([r.patient_id for r in data.records])
    todo = config.only_folds if config.only_folds is not None else range(config.folds)
    for k in todo:
        fold_dir = out / f"fold{k}"
        if (fold_dir / FOLD_DONE).exists():
            logger.info("fold %d already done", k)
            continue
        fold_dir.mkdir(exist_ok=True)
        held = np.flatnonzero(fold == k)
        train_idx = np.flatnonzero(fold != k)
        held_images = tensors[torch.from_numpy(held)]
        per_epoch: dict[str, np.ndarray] = {}

        def record(
            epoch: int,
            model: torch.nn.Module,
            held_images: Any = held_images,
            per_epoch: dict[str, np.ndarray] = per_epoch,
        ) -> None:
            per_epoch[f"epoch{epoch}"] = predict_logits(model, held_images, channels_last=True)

        begun = time.perf_counter()
        # an interrupted fold resumes its weights, but the per-epoch snapshots before the
        # interruption are lost; they are only informative, the final variants are complete
        train_images = tensors[torch.from_numpy(train_idx)]
        train_targets = targets[train_idx]
        weights = np.ones(len(train_idx))
        if extra is not None:  # training-only images; none of a held-out patient
            use = extra.usable(set(patients[held].tolist()))
            train_images = torch.cat([train_images, extra.tensors[torch.from_numpy(use)]])
            train_targets = np.concatenate([train_targets, extra.targets[use]])
            weights = np.concatenate([weights, extra.weights[use]])
        model, ema_model, history = fit(
            recipe,
            train_images,
            train_targets,
            spec,
            state_path=fold_dir / FOLD_STATE,
            on_epoch=record,
            progress=config.progress,
            desc=f"fold {k + 1}/{config.folds}",
            sample_weights=weights,
        )
        variants = {
            "final": predict_logits(model, held_images, channels_last=True),
            "final_tta": flip_tta_logits(model, held_images),
            **per_epoch,
        }
        if ema_model is not None:
            variants["ema"] = predict_logits(ema_model, held_images, channels_last=True)
            variants["ema_tta"] = flip_tta_logits(ema_model, held_images)
        fold_spec = spec.replace(
            name=f"fold{k}",
            training={"recipe": recipe.to_dict(), "fold": k, "history": history},
        )
        save_checkpoint(model, fold_spec, fold_dir / "model", dtype=torch.float16)
        if ema_model is not None:
            save_checkpoint(ema_model, fold_spec, fold_dir / "model_ema", dtype=torch.float16)
        seconds = time.perf_counter() - begun
        tmp = fold_dir / "predictions.tmp.npz"
        arrays: dict[str, Any] = {"index": held, "seconds": np.asarray(seconds), **variants}
        np.savez(tmp, **arrays)
        tmp.replace(fold_dir / FOLD_DONE)
        (fold_dir / FOLD_STATE).unlink(missing_ok=True)
        print(f"fold {k + 1}/{config.folds} done in {seconds:.0f} s", flush=True)
    summary = oof.collect_run(out, data, fold)
    summary.update(
        {
            "recipe": recipe.to_dict(),
            "folds": config.folds,
            "fold_seed": config.fold_seed,
            "images": oof.relative_data_path(config.images),
            "labels": oof.relative_data_path(config.labels),
            "command": config.command,
            "sources": extra.counts if extra is not None else [],
            "extra_images_per_fold": [
                len(extra.usable(set(patients[fold == k].tolist()))) for k in range(config.folds)
            ]
            if extra is not None
            else [],
            "session_seconds": round(time.perf_counter() - started, 1),
        }
    )
    (out / "cv.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(oof.format_table(summary["variants"], title=str(out)), flush=True)
    return summary


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


__all__: Sequence[str] = (
    "CVConfig",
    "ExtraData",
    "Source",
    "load_extra",
    "Recipe",
    "fit",
    "flip_tta_logits",
    "parse_folds",
    "patient_folds",
    "recipe_spec",
    "run_cv",
)
