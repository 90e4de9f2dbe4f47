"""Training-only images beside the main data (:class:`~training.recipe.Source`), decoded once.

A fold may train on an extra image only when its patient is not among the fold's held-out
patients (:meth:`ExtraData.usable`), so extra data can never leak into out-of-fold scores; the
final fit uses them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data import load_tensors
from training.recipe import Source
from training.runs import describe_source
from training.splits import load_task_data

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec


@dataclass
class ExtraData:
    """The images of every extra source: tensors, task targets, patients, sampling weights and
    per-source counts (provenance for ``cv.json`` and the spec)."""

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


def load_extra(
    sources: Sequence[Source], known: set[str], spec: ModelSpec, task: str = "multilabel"
) -> ExtraData | None:
    """Decode every extra source for ``task`` (images already in the main data, named in
    ``known``, are left out); ``None`` without sources."""
    import torch

    if not sources:
        return None
    parts, targets, patients, weights, counts = [], [], [], [], []
    for source in sources:
        data, index = load_task_data(source.images, source.labels, task)
        keep = [i for i, r in enumerate(data.records) if r.image_index not in known]
        data = data.subset(keep)
        parts.append(load_tensors([index[r.image_index] for r in data.records], spec))
        targets.append(data.targets)
        patients += [r.patient_id for r in data.records]
        weights += [source.weight] * len(data)
        counts.append(
            {
                **describe_source(source),
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


__all__ = ["ExtraData", "load_extra"]
