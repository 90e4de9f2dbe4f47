"""Ensembles judged by cross-validation, from runs that already exist.

Every CV run leaves its out-of-fold (OOF) predictions (:mod:`training.cv`); for runs on the same
folds (same images, K and fold seed: :func:`training.runs.load_runs` refuses others) each image
was predicted by member models that never saw its patient, so the OOF prediction of an ensemble
of those members is simply the mean of their OOF probabilities (sigmoid per finding, or softmax
for the multiclass task; uncalibrated, temperature 1). It is scored like a single run, with the
patient bootstrap (:func:`training.oof.patient_bootstrap`), and shipped only where it beats the
best single model by :data:`SHIP_MARGIN` mean AUROC out of fold (issue 23).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.calibrate import probabilities
from training.oof import patient_bootstrap
from training.recipe import TrainingError

#: An ensemble must beat the best single model by this much OOF mean AUROC to be shipped.
SHIP_MARGIN = 0.01
#: Variants of a run that one served model reproduces (no flip TTA), the first present is used.
MEMBER_VARIANTS: tuple[str, ...] = ("ema", "final")


@dataclass(frozen=True)
class EnsembleSpec:
    """``[NAME=]CVDIR[:VARIANT],CVDIR[:VARIANT]...`` (the ``--ensemble`` flag): at least two
    member runs, each with its variant (``None``: ``ema`` where the run has it, else
    ``final``)."""

    name: str
    members: tuple[tuple[Path, str | None], ...]

    @classmethod
    def parse(cls, text: str) -> EnsembleSpec:
        name, _, rest = text.rpartition("=")
        members: list[tuple[Path, str | None]] = []
        for part in rest.split(","):
            if not part.strip():
                continue
            path, _, variant = part.strip().partition(":")
            members.append((Path(path), variant or None))
        if len(members) < 2:
            raise TrainingError(
                f"--ensemble takes [NAME=]CVDIR[:VARIANT],CVDIR[:VARIANT]... (two members or "
                f"more), got {text!r}"
            )
        if len(set(members)) != len(members):
            raise TrainingError(f"--ensemble names a member twice: {text!r}")
        return cls(name or "+".join(p.name for p, _ in members), tuple(members))


def _variant(run: Mapping[str, Any], wanted: str | None) -> str:
    logits = run["logits"]
    if wanted is not None:
        if wanted not in logits or np.isnan(logits[wanted]).any():
            raise TrainingError(f"{run['dir']} has no complete variant {wanted!r}")
        return wanted
    for name in MEMBER_VARIANTS:
        if name in logits and not np.isnan(logits[name]).any():
            return name
    raise TrainingError(f"{run['dir']} has none of the variants {MEMBER_VARIANTS}")


def ensemble_oof(
    members: Sequence[tuple[Mapping[str, Any], str | None]],
) -> tuple[np.ndarray, list[str]]:
    """The mean OOF probabilities of ``(run, variant)`` members (runs of
    :func:`training.runs.load_runs`) and the variants used.

    Raises
    ------
    TrainingError
        Fewer than two members, members of different tasks or classes, OOF rows of other
        images, or a missing variant.
    """
    if len(members) < 2:
        raise TrainingError("an ensemble needs two members or more")
    first = members[0][0]
    task = first["summary"].get("task", "multilabel")
    names = first["summary"].get("class_names")
    used: list[str] = []
    probs = []
    for run, wanted in members:
        summary = run["summary"]
        if summary.get("task", "multilabel") != task or summary.get("class_names") != names:
            raise TrainingError(f"{run['dir']}: another task or other classes than {first['dir']}")
        if list(run["images"]) != list(first["images"]):
            raise TrainingError(f"{run['dir']}: OOF rows of other images than {first['dir']}")
        variant = _variant(run, wanted)
        used.append(variant)
        probs.append(probabilities(run["logits"][variant], task))
    return np.mean(probs, axis=0), used


def score_ensemble(members: Sequence[tuple[Mapping[str, Any], str | None]]) -> dict[str, Any]:
    """The patient-bootstrap AUROC table of the ensemble of ``members`` (as for one run's
    variant), with the members and their variants."""
    mean, used = ensemble_oof(members)
    first = members[0][0]
    row = patient_bootstrap(first["labels"], mean, first["patients"])
    row["members"] = [
        {"dir": run["dir"], "arch": run["summary"]["recipe"]["arch"], "variant": variant}
        for (run, _), variant in zip(members, used, strict=True)
    ]
    return row


def ship_decision(
    singles: Mapping[str, Mapping[str, Any]],
    ensemble_row: Mapping[str, Any],
    margin: float = SHIP_MARGIN,
) -> dict[str, Any]:
    """Ship the ensemble only if its OOF mean AUROC beats the best single model's by
    ``margin``: the best single row, the gain and the verdict."""
    if not singles:
        raise TrainingError("no single model to compare the ensemble with")
    best = max(singles, key=lambda name: singles[name]["mean"][0])
    gain = float(ensemble_row["mean"][0]) - float(singles[best]["mean"][0])
    return {
        "best_single": best,
        "best_single_mean": singles[best]["mean"][0],
        "ensemble_mean": ensemble_row["mean"][0],
        "gain": round(gain, 4),
        "margin": margin,
        "ship": bool(gain >= margin - 1e-12),
    }


__all__ = [
    "EnsembleSpec",
    "MEMBER_VARIANTS",
    "SHIP_MARGIN",
    "ensemble_oof",
    "score_ensemble",
    "ship_decision",
]
