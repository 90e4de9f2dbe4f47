"""The shipped model: the CV-chosen recipe fitted on every labelled image, calibrated on OOF.

``triage train --final-from CVDIR --out OUT`` (or :func:`train_final`) reads the recipe of a
finished cross-validation run (:mod:`training.cv`), fits it once on all of that run's images
for the same fixed epoch count (there is no held-out data left to stop on), and fits what a
checkpoint needs *on the out-of-fold predictions of the same recipe* (every image predicted by a
model that did not see its patient), not on a small validation split:

* the temperature and a per-class logit shift
  (:func:`training.calibrate.fit_temperature_and_shift` on the OOF logits; the shift is added
  to the shipped classifier's bias, so serving applies only the temperature);
* per-class operating thresholds (:func:`training.oof.choose_operating_thresholds`: Youden
  points, raised together if the urgent share would exceed ``urgent_bound`` (default 1.3) x the
  share of studies that have any of the findings), with sensitivity, specificity and PPV and
  their patient-bootstrap intervals, and the urgent share's ratio to that share with its
  interval (:func:`training.oof.operating_points`);
* the drift reference histograms (:func:`training.oof.drift_reference`).

The weights are stored as fp16 (``OUT/NAME.safetensors`` + ``.json``, and the ONNX serving graph
``NAME.onnx`` checked against torch) where that changes no probability on the training images
by more than 0.01, as fp32 otherwise (the check's figures go into the spec either way); the OOD
reference is fitted on the training images (optimistic: there is no held-out image left).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from training import distributed
from training.data import degrade_resolution, degraded_choice, load_tensors, with_degraded
from training.fit import fit
from training.predict import classifier_layer, predict_logits
from training.recipe import Recipe, TrainingError
from training.runs import CVRun, read_oof, relative_data_path, sources_of
from training.sources import load_extra
from training.splits import load_task_data

logger = logging.getLogger(__name__)

#: Variants of a CV run that one serving model can reproduce (no TTA at serving time).
SERVABLE_VARIANTS: tuple[str, ...] = ("final", "ema")
#: Largest probability change fp16 storage may cause.
FP16_TOLERANCE = 0.01


def _default_name(recipe: Recipe) -> str:
    return f"cxr-triage-{recipe.arch.replace('efficientnet_', '')}-{recipe.task}"


def _calibration(logits: np.ndarray, y: np.ndarray, task: str) -> tuple[float, np.ndarray]:
    """Temperature and per-class logit shift fitted on the OOF logits: jointly for multilabel
    (:func:`training.calibrate.fit_temperature_and_shift`); the temperature alone for
    multiclass (a softmax's shift would change the arg-max the seed protocol scores)."""
    from training.calibrate import fit_temperature, fit_temperature_and_shift

    if task == "multiclass":
        return fit_temperature(logits, y.argmax(axis=1), task), np.zeros(logits.shape[1])
    return fit_temperature_and_shift(logits, y)


def train_final(
    cv_dir: Path,
    out: Path,
    *,
    variant: str = "ema",
    name: str = "",
    version: str = "2",
    images: Path | None = None,
    labels: Path | None = None,
    command: str = "",
    progress: bool = False,
    device: str = "cpu",
    workers: int = 0,
    urgent_bound: float | None = None,
) -> Path:
    """Fit the recipe of ``cv_dir`` on all its images and save a calibrated fp16 checkpoint.

    ``urgent_bound`` (default :data:`training.oof.URGENT_BOUND`) bounds the OOF urgent share as
    a multiple of the share with any finding.

    Returns the checkpoint name (``OUT/NAME``).

    Raises
    ------
    TrainingError
        Unfinished CV run, or a variant that one model cannot serve.
    """
    import torch

    from training import oof
    from training.calibrate import expected_calibration_error, probabilities
    from triage_core import __version__, ood
    from triage_core.models import save_checkpoint, storage_round_trip
    from triage_core.pretrained import pretrained_source

    bound = oof.URGENT_BOUND if urgent_bound is None else urgent_bound
    if not bound > 0:
        raise TrainingError(f"--urgent-bound must be positive, got {bound}")
    if variant not in SERVABLE_VARIANTS:
        raise TrainingError(f"--variant must be one of {SERVABLE_VARIANTS}, got {variant!r}")
    started = time.perf_counter()
    summary = CVRun(Path(cv_dir)).finished()
    recipe = Recipe.from_dict(summary["recipe"])
    task = recipe.task
    if variant == "ema" and not recipe.ema:
        raise TrainingError(f"{cv_dir} was run without EMA; use --variant final")
    images = images or Path(summary["images"])
    labels = labels or Path(summary["labels"])
    data, index = load_task_data(images, labels, task)
    oof_images, patients, y, logits = read_oof(CVRun(Path(cv_dir)).oof_csv)
    position = {r.image_index: i for i, r in enumerate(data.records)}
    missing = [name for name in oof_images if name not in position]
    if missing:
        raise TrainingError(
            f"{len(missing)} images of {cv_dir} are not under {images} (e.g. {missing[0]})"
        )
    data = data.subset([position[name] for name in oof_images])  # the CV run's images
    oof_logits = logits[variant]
    truth = y.argmax(axis=1) if task == "multiclass" else y  # the task's targets
    names = list(data.class_names)

    temperature, shift = _calibration(oof_logits, y, task)
    probs = probabilities(oof_logits + shift, task, temperature)
    thresholds, rule = oof.choose_operating_thresholds(probs, y, bound)
    points = oof.operating_points(probs, y, patients, names, thresholds, bound_factor=bound)
    drift = oof.drift_reference(probs, thresholds, names)
    auroc = oof.patient_bootstrap(y, oof_logits, patients)

    spec = recipe.spec()
    paths = [index[r.image_index] for r in data.records]
    tensors = load_tensors(paths, spec, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = load_extra(sources_of(summary), set(oof_images), spec, task)
    degraded = degraded_choice(len(data), recipe.degrade64, recipe.seed)
    low = load_tensors([paths[i] for i in degraded], spec, transform=degrade_resolution)
    train_images = with_degraded(tensors, np.arange(len(data)), degraded, low)
    train_targets = data.targets
    weights = np.ones(len(data))
    if extra is not None:  # every extra image: no patient is held out any more
        train_images = torch.cat([train_images, extra.tensors])
        train_targets = np.concatenate([train_targets, extra.targets])
        weights = np.concatenate([weights, extra.weights])
    device = distributed.resolve_device(device)
    dist = distributed.setup(device)
    result = fit(
        recipe,
        train_images,
        train_targets,
        spec,
        state_path=out / "state.pt",
        fingerprint=f"final:{len(train_targets)}:{relative_data_path(cv_dir)}",
        progress=progress,
        desc="all data",
        sample_weights=weights,
        device=device,
        workers=workers,
    )
    history = result.history
    if not dist.main:  # rank 0 alone calibrates and writes
        distributed.teardown()
        return out / (name or _default_name(recipe))
    chosen = (result.ema if variant == "ema" and result.ema is not None else result.model).cpu()
    chosen.eval()
    with torch.no_grad():  # the calibration's per-class shift lives in the classifier bias
        head = classifier_layer(chosen)
        assert head.bias is not None
        head.bias.add_(torch.as_tensor(shift, dtype=head.bias.dtype))
    l32 = predict_logits(chosen, tensors, channels_last=True)
    half = storage_round_trip(chosen, torch.float16)  # what the stored file gives back
    l16 = predict_logits(half, tensors, channels_last=True)
    p32, p16 = (probabilities(v, task, temperature) for v in (l32, l16))
    t = np.asarray(thresholds)
    flips = int(((p32 >= t) != (p16 >= t)).sum())
    fp16_check = {
        "images": len(p32),
        "max_abs_probability_difference": round(float(np.abs(p32 - p16).max()), 6),
        "decision_flips": flips,
        "tolerance": FP16_TOLERANCE,
    }
    store_fp16 = fp16_check["max_abs_probability_difference"] <= FP16_TOLERANCE
    if not store_fp16:  # the served probabilities must be the ones the figures are about
        logger.warning("fp16 weights change the outputs too much (%s): storing fp32", fp16_check)
    stored = half if store_fp16 else chosen

    runs_table = {f"{Path(cv_dir).name}:{k}": v for k, v in summary["variants"].items()}
    training = {
        "protocol": "fit on every labelled image; calibration, thresholds and drift reference "
        "fitted on the out-of-fold predictions of the same recipe",
        "recipe": recipe.to_dict(),
        "variant": variant,
        "cv_run": relative_data_path(cv_dir),
        "data": {
            **summary["data"],
            "n_images": summary["data"]["images"],
            "images": relative_data_path(images),
            "labels": relative_data_path(labels),
            "sources": extra.counts if extra is not None else [],
        },
        "out": relative_data_path(out),
        "pretrained": pretrained_source(recipe.arch, recipe.initial_weights()),
        "init_from": recipe.init_from,
        "world_size": dist.world,
        "history": history,
        "weights_dtype": "float16" if store_fp16 else "float32",
        "fp16_check": fp16_check,
        "torch": torch.__version__,
        "command": command,
        "seconds": round(time.perf_counter() - started, 1),
    }
    metrics = {
        "protocol": f"{summary['folds']}-fold patient-wise cross-validation (fold seed "
        f"{summary['fold_seed']}), out-of-fold predictions of the shipped recipe",
        "oof": {
            "variant": variant,
            "auroc": dict(zip(names, auroc["per_class"], strict=True)),
            "mean_auroc": auroc["mean"],
            "ece_before": round(
                expected_calibration_error(probabilities(oof_logits, task, 1.0), truth, task), 4
            ),
            "ece_after": round(expected_calibration_error(probs, truth, task), 4),
            "logit_shift": [round(float(v), 6) for v in shift],
        },
        "threshold_rule": rule,
        "operating_points": points,
        "cv_table": runs_table,
    }
    final = spec.replace(
        name=name or _default_name(recipe),
        version=version,
        temperature=float(temperature),
        thresholds=list(thresholds),
        training=training,
        metrics=metrics,
        drift=drift,
        code_version=__version__,
    )
    final = final.replace(ood=ood.fit_reference(stored, final, tensors))
    path = save_checkpoint(
        stored, final, out / final.name, dtype=torch.float16 if store_fp16 else None
    )
    (out / "state.pt").unlink(missing_ok=True)
    from training.onnx_export import export_after_training

    export_after_training(path, tensors)  # NAME.onnx, the serving graph, checked against torch
    distributed.teardown()
    print(
        f"saved {path}: OOF mean AUROC {auroc['mean']}, temperature {temperature:.3f}, "
        f"thresholds {[round(x, 3) for x in thresholds]}, urgent share "
        f"{points['urgent_share']} (any finding {points['any_finding_share']}; ratio "
        f"{points['urgent_ratio']}, bound {bound:g})",
        flush=True,
    )
    return path
