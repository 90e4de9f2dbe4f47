"""The on-disk layout of a cross-validation run, in one place.

::

    OUT/folds.csv                 image, patient, fold (written once; a rerun must match it)
    OUT/fold{k}/state.pt          train state of an unfinished fold (training.state)
    OUT/fold{k}/predictions.npz   held-out logits of every variant; its presence = fold done
    OUT/fold{k}/model[_ema].*     the fold's fp16 checkpoint(s)
    OUT/oof.csv                   labels and every variant's out-of-fold logits
    OUT/cv.json                   recipe, data provenance, timings, the OOF table

:class:`CVRun` reads and writes these files; :mod:`training.cv` decides what goes in them and
:mod:`training.oof` computes statistics on them. Paths recorded in run files are made relative
to the repository (:func:`relative_data_path`), never a machine's absolute path.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.recipe import Source, TrainingError

if TYPE_CHECKING:
    from training.data import TaskData

FOLDS_CSV = "folds.csv"
OOF_CSV = "oof.csv"
CV_JSON = "cv.json"
#: File a finished fold leaves behind (its presence means "done, skip on resume").
FOLD_DONE = "predictions.npz"
#: Resumable state of an unfinished fold.
FOLD_STATE = "state.pt"


def relative_data_path(path: Path | str) -> str:
    """A data path as written in cards and run files: relative to the repository when it lies
    in the shared data folder (``../shared/data/...``), never a machine's absolute path."""
    text = str(path)
    marker = "/shared/data/"
    if marker in text:
        return "../shared/data/" + text.split(marker, 1)[1]
    p = Path(text)
    if p.is_absolute():
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return p.name
    return text


def describe_source(source: Source) -> dict[str, Any]:
    """A source's provenance as recorded in ``cv.json`` and the spec."""
    return {
        "images": relative_data_path(source.images),
        "labels": relative_data_path(source.labels),
        "weight": source.weight,
    }


def sources_of(summary: Mapping[str, Any]) -> list[Source]:
    """The extra sources a ``cv.json`` records."""
    return [
        Source(Path(x["images"]), Path(x["labels"]), float(x["weight"]))
        for x in summary.get("sources", [])
    ]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass(frozen=True)
class CVRun:
    """A cross-validation run folder (see the module docstring)."""

    root: Path

    @property
    def folds_csv(self) -> Path:
        return self.root / FOLDS_CSV

    @property
    def oof_csv(self) -> Path:
        return self.root / OOF_CSV

    @property
    def cv_json(self) -> Path:
        return self.root / CV_JSON

    def fold_dir(self, k: int) -> Path:
        return self.root / f"fold{k}"

    def fold_state(self, k: int) -> Path:
        return self.fold_dir(k) / FOLD_STATE

    def fold_predictions(self, k: int) -> Path:
        return self.fold_dir(k) / FOLD_DONE

    def fold_done(self, k: int) -> bool:
        return self.fold_predictions(k).is_file()

    # ----------------------------------------------------------------------------------------
    # folds

    def record_folds(self, data: TaskData, fold: np.ndarray) -> None:
        """Write ``folds.csv``, or check that an existing one holds the same assignment (a
        resumed run must see the same images in the same folds)."""
        now = [
            (r.image_index, r.patient_id, int(f)) for r, f in zip(data.records, fold, strict=True)
        ]
        if self.folds_csv.exists():
            with self.folds_csv.open(newline="") as handle:
                saved = [(r["Image Index"], int(r["fold"])) for r in csv.DictReader(handle)]
            if saved != [(name, f) for name, _, f in now]:
                raise TrainingError(
                    f"{self.folds_csv} holds other folds (different images or seed); "
                    "use a new --out"
                )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.folds_csv.with_name(FOLDS_CSV + ".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Image Index", "Patient ID", "fold"])
            writer.writerows(now)
        tmp.replace(self.folds_csv)

    # ----------------------------------------------------------------------------------------
    # fold predictions

    def save_fold(
        self, k: int, index: np.ndarray, seconds: float, variants: Mapping[str, np.ndarray]
    ) -> None:
        """Mark fold ``k`` done: its held-out indices, time and logits per variant; its train
        state is removed."""
        tmp = self.fold_dir(k) / "predictions.tmp.npz"
        arrays: dict[str, Any] = {"index": index, "seconds": np.asarray(seconds), **variants}
        np.savez(tmp, **arrays)
        tmp.replace(self.fold_predictions(k))
        self.fold_state(k).unlink(missing_ok=True)

    def pool(self, n: int, k: int) -> tuple[dict[str, np.ndarray], list[float]]:
        """Every variant's held-out logits of the ``k`` folds as ``(n, C)`` arrays (NaN where a
        fold lacks the variant), and each fold's seconds."""
        pooled: dict[str, np.ndarray] = {}
        seconds: list[float] = []
        for f in range(k):
            path = self.fold_predictions(f)
            if not path.exists():
                raise TrainingError(f"fold {f} of {self.root} is not finished ({path} missing)")
            with np.load(path) as saved:
                index = saved["index"]
                seconds.append(round(float(saved["seconds"]), 1))
                for name in saved.files:
                    if name in ("index", "seconds"):
                        continue
                    logits = saved[name]
                    if name not in pooled:
                        pooled[name] = np.full((n, logits.shape[1]), np.nan, dtype=np.float64)
                    pooled[name][index] = logits
        return pooled, seconds

    # ----------------------------------------------------------------------------------------
    # oof.csv and cv.json

    def write_oof(self, data: TaskData, fold: np.ndarray, pooled: Mapping[str, np.ndarray]) -> None:
        """``oof.csv``: image, patient, fold, the 0/1 label per class (one-hot for multiclass)
        and ``VARIANT:CLASS`` logit columns."""
        names = list(data.class_names)
        variants = sorted(pooled)
        y = data.multi_hot()
        tmp = self.oof_csv.with_name(OOF_CSV + ".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["Image Index", "Patient ID", "fold", *names]
                + [f"{v}:{c}" for v in variants for c in names]
            )
            for i, record in enumerate(data.records):
                writer.writerow(
                    [record.image_index, record.patient_id, int(fold[i])]
                    + [int(v) for v in y[i]]
                    + [f"{pooled[v][i, c]:.6f}" for v in variants for c in range(len(names))]
                )
        tmp.replace(self.oof_csv)

    def read_oof(self) -> tuple[list[str], list[str], np.ndarray, dict[str, np.ndarray]]:
        return read_oof(self.oof_csv)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        _atomic_text(self.cv_json, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def read_summary(self) -> dict[str, Any]:
        if not self.cv_json.is_file():
            raise TrainingError(
                f"{self.root} has no {CV_JSON}: run `triage train --cv K --out {self.root}`"
            )
        summary: dict[str, Any] = json.loads(self.cv_json.read_text())
        return summary

    def finished(self) -> dict[str, Any]:
        """The ``cv.json`` of a run whose every fold is done.

        Raises
        ------
        TrainingError
            No ``cv.json``, or a fold without its predictions.
        """
        summary = self.read_summary()
        for k in range(int(summary["folds"])):
            if not self.fold_done(k):
                raise TrainingError(f"fold {k} of {self.root} is not finished")
        return summary


def read_oof(path: Path) -> tuple[list[str], list[str], np.ndarray, dict[str, np.ndarray]]:
    """``(images, patients, labels (N, C), {variant: logits (N, C)})`` from an ``oof.csv``."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    names = [h for h in header[3:] if ":" not in h]
    c = len(names)
    variants: dict[str, list[int]] = {}
    for j, h in enumerate(header):
        if ":" in h:
            variants.setdefault(h.split(":", 1)[0], []).append(j)
    images = [r[0] for r in rows]
    patients = [r[1] for r in rows]
    labels = np.asarray([[float(v) for v in r[3 : 3 + c]] for r in rows])
    logits = {
        v: np.asarray([[float(r[j]) for j in cols] for r in rows]) for v, cols in variants.items()
    }
    return images, patients, labels, logits


def load_runs(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Each run's ``cv.json`` and OOF logits; the runs must cover the same images in the same
    folds (compared on ``folds.csv``), else they are refused.

    Raises
    ------
    TrainingError
        A run without ``cv.json``/``oof.csv``, or on other folds than the first.
    """
    runs = []
    reference: str | None = None
    for d in dirs:
        run = CVRun(Path(d))
        summary = run.read_summary()
        if not run.oof_csv.is_file() or not run.folds_csv.is_file():
            raise TrainingError(f"{d} lacks {OOF_CSV} or {FOLDS_CSV}: not a finished CV run")
        folds = run.folds_csv.read_text()
        if reference is None:
            reference = folds
        elif folds != reference:
            raise TrainingError(
                f"{d} used other folds than {dirs[0]} (other images, fold seed or K): "
                "out-of-fold results are only comparable on the same folds"
            )
        images, patients, labels, logits = run.read_oof()
        runs.append(
            {
                "dir": str(d),
                "summary": summary,
                "images": images,
                "patients": patients,
                "labels": labels,
                "logits": logits,
            }
        )
    return runs


__all__ = [
    "CVRun",
    "FOLD_DONE",
    "FOLD_STATE",
    "describe_source",
    "load_runs",
    "read_oof",
    "relative_data_path",
    "sources_of",
]
