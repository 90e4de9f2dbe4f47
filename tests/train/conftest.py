"""Helpers of the training tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture
def sklearn_check() -> Callable[[Path, dict[str, Any], tuple[str, ...]], None]:
    """:func:`check_against_sklearn`, for the tests of ``triage evaluate``."""
    return check_against_sklearn


def check_against_sklearn(out: Path, metrics: dict[str, Any], class_names: tuple[str, ...]) -> None:
    """Every figure of ``metrics.json`` recomputed with scikit-learn from ``predictions.csv``."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    from training.evaluate import read_predictions

    names, y, p = read_predictions(out / "predictions.csv", class_names)
    assert len(names) == metrics["images"] == len(set(names))
    for k, name in enumerate(class_names):
        row = metrics["per_class"][name]
        if 0 < y[:, k].sum() < len(y):
            assert row["auroc"] == pytest.approx(roc_auc_score(y[:, k], p[:, k]), abs=1e-5)
            low, high = row["auroc_ci95"]
            if low is not None:
                assert low <= row["auroc"] + 1e-9 and row["auroc"] <= high + 1e-9
        else:
            assert row["auroc"] is None
    if metrics["task"] == "multiclass":
        y_true, y_pred = y.argmax(axis=1), p.argmax(axis=1)
        assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
        assert metrics["macro_f1"] == pytest.approx(
            f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2], zero_division=0)
        )
        rec = recall_score(y_true, y_pred, average=None, labels=[0, 1, 2], zero_division=0)
        for k, name in enumerate(class_names):
            assert metrics["per_class"][name]["recall"] == pytest.approx(rec[k])
        assert np.asarray(metrics["confusion_matrix"]).sum() == len(names)
    else:
        called = (p.astype(np.float32) >= np.asarray(metrics["thresholds"])[None, :]).astype(int)
        f1s = []
        for k, name in enumerate(class_names):
            row = metrics["per_class"][name]
            assert row["precision"] == pytest.approx(
                precision_score(y[:, k], called[:, k], zero_division=0), abs=1e-6
            )
            assert row["recall"] == pytest.approx(
                recall_score(y[:, k], called[:, k], zero_division=0), abs=1e-6
            )
            f1s.append(f1_score(y[:, k], called[:, k], zero_division=0))
        assert metrics["macro_f1"] == pytest.approx(float(np.mean(f1s)), abs=1e-6)
        assert metrics["accuracy"] == pytest.approx(float((called == y).mean()), abs=1e-6)
