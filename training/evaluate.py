"""Evaluate a checkpoint: metrics with bootstrap intervals, per-image predictions, plots.

:func:`evaluate_checkpoint` scores a checkpoint on a labelled set: every image of the label file
found in the image folder that the checkpoint's task keeps (``split="all"``, the default: an
external set; no training configuration is needed). For a checkpoint of the former single-split
training, which records its split, ``split="test"`` (``"val"``, ``"train"``) rebuilds that split
and checks it against the recorded fingerprint, so a test set can never silently overlap the
training images. It writes into the output folder:

* ``metrics.json``: see :func:`compute_metrics`;
* ``predictions.csv``: one row per image: ``Image Index``, ``Patient ID``, ``Finding Labels``,
  the 0/1 target per class and the calibrated probability per class;
* ``roc.png``, ``reliability.png``, ``confusion.png`` (multiclass) and ``cam_grid.png``
  (Grad-CAM of a few test images, when ``triage_core.cam`` is available, with the radiologists'
  boxes drawn on the images that have some);
* with a box file (``BBox_List_2017.csv``, by default next to the labels): the pointing game
  (:mod:`training.pointing`) in ``metrics.json["pointing_game"]`` (Grad-CAM maximum inside the
  box vs the image centre) and ``pointing_grid.png`` (every boxed image: map, box, maximum and
  centre).

Metric definitions
------------------
* Multiclass: ``accuracy`` and per-class precision/recall/F1 from the arg-max class;
  ``macro_f1`` their unweighted mean; confusion matrix rows = true class, columns = predicted.
* Multilabel: per-class precision/recall/F1 at the checkpoint's operating thresholds
  (``probability >= threshold``); ``macro_f1`` their mean; ``accuracy`` the mean per-class
  accuracy at those thresholds; ``exact_match`` the fraction of images with all classes right.
* Both: per-class AUROC (one-vs-rest) with a 95 % percentile bootstrap interval over images
  (``n_boot`` resamples, seeded); expected calibration error (10 equal-width bins) before
  (temperature 1) and after temperature scaling.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.calibrate import expected_calibration_error, probabilities, reliability_pairs
from training.data import DatasetError, LabelRecord, TaskData
from training.pointing import (
    NIH_SIDE,
    Box,
    boxes_by_image,
    draw_box,
    format_pointing,
    pointing_game,
    read_boxes,
)

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("test", "val", "train", "all")


def bootstrap_auroc(
    y: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC and its 95 % percentile bootstrap interval (NaN when undefined).

    Resamples without both classes are skipped; the interval is NaN when fewer than half of the
    resamples are valid.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=np.float64)
    if y.min(initial=0) == y.max(initial=0) or len(np.unique(y)) < 2:
        return float("nan"), float("nan"), float("nan")
    auc = float(roc_auc_score(y, score))
    rng = np.random.default_rng(seed)
    values = []
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        values.append(roc_auc_score(yb, score[idx]))
    if not values or len(values) < n_boot / 2:
        return auc, float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return auc, float(low), float(high)


def compute_metrics(
    task: str,
    class_names: Sequence[str],
    targets: np.ndarray,
    probs: np.ndarray,
    thresholds: Sequence[float],
    probs_uncalibrated: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of the module docstring, as a JSON-ready dict."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    names = list(class_names)
    c = len(names)
    specificity: list[float | None] = []
    probs = np.asarray(probs, dtype=np.float64)
    if task == "multiclass":
        y_true = np.asarray(targets, dtype=np.int64)
        y_pred = probs.argmax(axis=1)
        multi_hot = np.eye(c)[y_true]
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(c)), zero_division=0
        )
        accuracy = float((y_pred == y_true).mean())
        extra: dict[str, Any] = {
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(range(c))).tolist(),
            "confusion_matrix_axes": "rows: true class, columns: predicted class",
        }
    else:
        multi_hot = (np.asarray(targets) > 0.5).astype(int)
        t = np.asarray(thresholds, dtype=np.float64)[None, :]
        called = (probs >= t).astype(int)
        precision, recall, f1, support = (
            np.zeros(c),
            np.zeros(c),
            np.zeros(c),
            np.zeros(c, dtype=int),
        )
        for k in range(c):
            p, r, f, s = precision_recall_fscore_support(
                multi_hot[:, k], called[:, k], labels=[1], zero_division=0
            )
            precision[k], recall[k], f1[k], support[k] = p[0], r[0], f[0], s[0]
        negatives = multi_hot == 0
        specificity = [
            float((called[negatives[:, k], k] == 0).mean()) if negatives[:, k].any() else None
            for k in range(c)
        ]
        accuracy = float((called == multi_hot).mean())
        extra = {
            "exact_match": float((called == multi_hot).all(axis=1).mean()),
            "thresholds": [float(x) for x in thresholds],
            "negatives_all_classes": int((multi_hot.sum(axis=1) == 0).sum()),
        }
    per_class: dict[str, Any] = {}
    aucs = []
    for k, name in enumerate(names):
        auc, low, high = bootstrap_auroc(multi_hot[:, k], probs[:, k], n_boot, seed + k)
        if math.isfinite(auc):
            aucs.append(auc)
        per_class[name] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
            **({"specificity": specificity[k]} if task == "multilabel" else {}),
            "auroc": _finite(auc),
            "auroc_ci95": [_finite(low), _finite(high)],
        }
    best_recall = max(names, key=lambda n: per_class[n]["recall"])
    out: dict[str, Any] = {
        "task": task,
        "images": int(len(probs)),
        "accuracy": accuracy,
        "macro_f1": float(np.mean(f1)),
        "mean_auroc": _finite(float(np.mean(aucs))) if aucs else None,
        "best_recall_class": best_recall,
        "per_class": per_class,
        "ece_after": _finite(expected_calibration_error(probs, targets, task)),
        "n_boot": n_boot,
    }
    if probs_uncalibrated is not None:
        out["ece_before"] = _finite(expected_calibration_error(probs_uncalibrated, targets, task))
    out.update(extra)
    return out


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def write_predictions(
    path: Path,
    records: Sequence[LabelRecord],
    multi_hot: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
) -> None:
    """``predictions.csv``: one row per image (name, patient, labels, targets, probabilities)."""
    header = ["Image Index", "Patient ID", "Finding Labels"]
    header += [f"target_{n}" for n in class_names] + [f"prob_{n}" for n in class_names]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for record, y, p in zip(records, multi_hot, probs, strict=True):
            writer.writerow(
                [record.image_index, record.patient_id, "|".join(record.labels)]
                + [int(v) for v in y]
                + [f"{float(v):.9g}" for v in p]
            )


def read_predictions(
    path: Path, class_names: Sequence[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read ``predictions.csv`` back: image names, ``(N, C)`` targets, ``(N, C)`` probs."""
    names, ys, ps = [], [], []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            names.append(row["Image Index"])
            ys.append([int(row[f"target_{n}"]) for n in class_names])
            ps.append([float(row[f"prob_{n}"]) for n in class_names])
    return names, np.asarray(ys), np.asarray(ps)


# --------------------------------------------------------------------------------------------
# plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(
    path: Path,
    multi_hot: np.ndarray,
    probs: np.ndarray,
    metrics: Mapping[str, Any],
    class_names: Sequence[str],
    title: str,
) -> None:
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for k, name in enumerate(class_names):
        y = multi_hot[:, k]
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, k])
        info = metrics["per_class"][name]
        low, high = info["auroc_ci95"]
        ci = f" [{low:.2f}, {high:.2f}]" if low is not None else ""
        ax.plot(fpr, tpr, label=f"{name} {info['auroc']:.2f}{ci}")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8, title="AUROC [95% CI]")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(
    path: Path, matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str
) -> None:
    plt = _pyplot()
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                color="white" if m[i, j] > m.max() / 2 else "black",
            )
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(
    path: Path,
    targets: np.ndarray,
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    task: str,
    title: str,
    bins: int = 10,
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    edges = np.linspace(0, 1, bins + 1)
    for label, probs, style in (("T = 1", probs_before, "o--"), ("calibrated", probs_after, "s-")):
        conf, outcome = reliability_pairs(probs, targets, task)
        which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            mask = which == b
            if mask.any():
                xs.append(conf[mask].mean())
                ys.append(outcome[mask].mean())
        ece = expected_calibration_error(probs, targets, task, bins)
        ax.plot(xs, ys, style, label=f"{label} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(
        xlabel="predicted probability",
        ylabel="observed frequency",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cam_grid(
    path: Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    image_paths: Sequence[Path],
    records: Sequence[LabelRecord],
    probs: np.ndarray,
    max_images: int = 8,
    boxes: Mapping[str, Sequence[Box]] | None = None,
) -> bool:
    """Grad-CAM of the top class for up to ``max_images`` images, with labels and
    probabilities; uses ``triage_core.cam.CamExplainer`` (which releases its hooks after every
    map). Images with radiologists' ``boxes`` (by image name) come first and show them (the
    explained class's boxes in green, others dashed). Returns False (and logs why) when
    unavailable."""
    try:
        from triage_core import cam as cam_module
    except ImportError as exc:
        logger.warning("Grad-CAM grid skipped: triage_core.cam is not available (%s)", exc)
        return False
    from triage_core.imaging import load_image

    explainer_cls = getattr(cam_module, "CamExplainer", None)
    if explainer_cls is None:
        logger.warning("Grad-CAM grid skipped: triage_core.cam has no CamExplainer")
        return False
    plt = _pyplot()
    boxes = boxes or {}
    order = sorted(range(len(image_paths)), key=lambda j: records[j].image_index not in boxes)
    n = min(max_images, len(image_paths))
    if n == 0:
        return False
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), dpi=100, squeeze=False)
    explainer = explainer_cls(model, spec, device="cpu")
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i >= n:
            continue
        j = order[i]
        image = load_image(image_paths[j])
        top = int(np.argmax(probs[j]))
        truth = ",".join(lab for lab in records[j].labels if lab in spec.class_names)
        title = (
            f"{records[j].image_index}\ntrue: {truth or 'none of 3'}\n"
            f"{spec.class_names[top]} p={probs[j, top]:.2f}"
        )
        try:
            ax.imshow(explainer.explain(image, top).overlay)
        except cam_module.ExplanationError as exc:
            logger.warning("Grad-CAM failed for %s: %s", records[j].image_index, exc)
            ax.imshow(image, cmap="gray")
            title += " (no CAM)"
        for box in boxes.get(records[j].image_index, ()):
            dashed = box.label != spec.class_names[top]
            draw_box(ax, box, image.shape[0], image.shape[1], linestyle="--" if dashed else "-")
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_pointing_grid(
    path: Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    result: Mapping[str, Any],
    images: Mapping[str, Path],
) -> bool:
    """Every pointing-game item: the map of the boxed class, the box (green), the map's
    maximum (white cross: hit, red cross: miss) and the image centre (cyan circle)."""
    from triage_core.cam import CamExplainer
    from triage_core.imaging import load_image

    items = list(result.get("items", ()))
    if not items:
        return False
    plt = _pyplot()
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), dpi=100, squeeze=False)
    explainer = CamExplainer(model, spec, device="cpu")
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i >= len(items):
            continue
        item = items[i]
        image = load_image(images[item["image"]])
        height, width = image.shape
        ax.imshow(explainer.explain(image, spec.class_names.index(item["class"])).overlay)
        draw_box(ax, Box(item["image"], item["class"], *item["box"]), height, width)
        sx, sy = width / NIH_SIDE, height / NIH_SIDE
        if item["peak"] is not None:  # an empty map points nowhere
            ax.plot(item["peak"][0] * sx, item["peak"][1] * sy, "x", ms=9, mew=2,
                    color="white" if item["hit"] else "red")  # fmt: skip
        ax.plot(width / 2, height / 2, "o", ms=6, mfc="none", mew=1.5, color="cyan")
        verdict = "hit" if item["hit"] else "miss"
        ax.set_title(f"{item['image']}\n{item['class']}: {verdict}", fontsize=7)
    fig.suptitle(format_pointing(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _pointing(
    model: torch.nn.Module,
    spec: ModelSpec,
    labels: Path,
    images: Path,
    bbox_csv: Path | None,
    bbox_images: Sequence[Path],
) -> tuple[dict[str, Any] | None, dict[str, list[Box]], dict[str, Path]]:
    """Pointing game over the boxed images found in ``images`` and ``bbox_images``."""
    from training.data import index_images

    path = bbox_csv if bbox_csv is not None else labels.parent / "BBox_List_2017.csv"
    if not path.is_file():
        if bbox_csv is not None:
            raise DatasetError(f"box file {bbox_csv} does not exist")
        return None, {}, {}
    boxes = read_boxes(path)
    index: dict[str, Path] = {}
    for folder in (*bbox_images, images):  # the evaluated folder wins on duplicate names
        index.update(index_images(folder))
    result = pointing_game(model, spec, boxes, index)
    logger.info("%s", format_pointing(result))
    return result, boxes_by_image(boxes, spec.class_names), index


# --------------------------------------------------------------------------------------------
# the command


def rebuild_split(spec: ModelSpec, images: Path, labels: Path, split: str) -> TaskData:
    """The images of ``split`` for this checkpoint (see the module docstring).

    Raises
    ------
    DatasetError
        Unknown split, or the data no longer gives the split recorded in the checkpoint.
    """
    from training.splits import SplitConfig, load_task_data, make_split, split_fingerprint

    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    info = dict(spec.training.get("data", {}).get("split", {}) or {})
    max_images = info.get("max_images") if split != "all" else None
    data, _ = load_task_data(images, labels, spec.task, max_images, int(info.get("seed", 0)))
    if split == "all":
        return data
    if not info:
        raise DatasetError(
            "this checkpoint records no training split; evaluate it with --split all"
        )
    config = SplitConfig(
        data_seed=int(info.get("seed", 0)),
        split_fractions=tuple(info.get("fractions", (0.6, 0.2, 0.2))),  # type: ignore[arg-type]
        train_val_list=Path(info["train_val_list"]) if info.get("train_val_list") else None,
        test_list=Path(info["test_list"]) if info.get("test_list") else None,
    )
    parts = make_split(data, config)
    recorded = info.get("fingerprint")
    if recorded and split_fingerprint(data, parts) != recorded:
        raise DatasetError(
            f"the images/labels given do not reproduce the checkpoint's training split "
            f"(fingerprint {recorded}): its {split} set cannot be identified. Use the same "
            "files, or --split all for an external set"
        )
    return data.subset(parts.parts()[split])


def evaluate_checkpoint(
    checkpoint: str | Path,
    images: Path,
    labels: Path,
    out: Path,
    *,
    split: str = "all",
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
    cam_images: int = 8,
    progress: bool = False,
    bbox_csv: Path | None = None,
    bbox_images: Sequence[Path] = (),
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on a split and write the files of the module docstring.

    ``bbox_csv`` (default: ``BBox_List_2017.csv`` beside ``labels``, when present) turns on the
    pointing game over every boxed image found in ``images`` and ``bbox_images`` (all of them,
    whatever their split: boxed images are rare; each item names its image).

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    import time

    from training.data import attach_images, index_images, load_tensors
    from training.predict import predict_logits
    from triage_core.models import load_checkpoint

    model, spec = load_checkpoint(checkpoint)
    data = rebuild_split(spec, images, labels, split)
    _, paths = attach_images(data.records, index_images(images))
    tensors = load_tensors(paths, spec, progress=progress)
    started = time.perf_counter()
    logits = predict_logits(model, tensors, batch_size=batch_size)
    seconds = time.perf_counter() - started
    probs = probabilities(logits, spec.task, spec.temperature)
    probs_raw = probabilities(logits, spec.task, 1.0)
    metrics = compute_metrics(
        spec.task, spec.class_names, data.targets, probs, spec.thresholds, probs_raw, n_boot, seed
    )
    metrics.update(
        {
            "checkpoint": str(checkpoint),
            "model": spec.display_name,
            "arch": spec.arch,
            "split": split,
            "temperature": spec.temperature,
            "class_counts": data.class_counts(),
            "inference_seconds": round(seconds, 3),
        }
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(
        out / "predictions.csv", data.records, data.multi_hot(), probs, spec.class_names
    )
    title = f"{spec.display_name} ({split}, n={len(data)})"
    plots = {"roc": "roc.png", "reliability": "reliability.png"}
    plot_roc(out / "roc.png", data.multi_hot(), probs, metrics, spec.class_names, title)
    plot_reliability(out / "reliability.png", data.targets, probs_raw, probs, spec.task, title)
    if spec.task == "multiclass":
        plot_confusion(out / "confusion.png", metrics["confusion_matrix"], spec.class_names, title)
        plots["confusion"] = "confusion.png"
    pointing, boxes, boxed = _pointing(model, spec, labels, images, bbox_csv, bbox_images)
    if pointing is not None:
        metrics["pointing_game"] = pointing
        if plot_pointing_grid(out / "pointing_grid.png", model, spec, pointing, boxed):
            plots["pointing_grid"] = "pointing_grid.png"
    if cam_images > 0 and plot_cam_grid(
        out / "cam_grid.png", model, spec, paths, data.records, probs, cam_images, boxes
    ):
        plots["cam_grid"] = "cam_grid.png"
    metrics["plots"] = plots
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote metrics, predictions and plots to %s", out)
    return metrics
