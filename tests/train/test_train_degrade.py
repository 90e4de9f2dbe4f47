"""`--degrade64 SHARE` (issue 23, item 1): a seeded share of the 256 px training images shown at
64 px and back, in training rows only; held-out images untouched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.data import degrade_resolution, degraded_choice
from training.recipe import Recipe, TrainingError


def test_degradation_is_a_64_px_round_trip(cxr14_dir: Path) -> None:
    from PIL import Image

    from triage_core.imaging import load_image
    from triage_core.resample import resize_antialiased

    path = sorted((cxr14_dir / "256").glob("*.png"))[0]
    image = load_image(path)
    low = degrade_resolution(image)
    assert low.shape == image.shape == (256, 256) and low.dtype == np.float32
    small = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.LANCZOS))
    small = np.rint(np.clip(small, 0, 1) * 255) / 255
    assert np.allclose(low, np.clip(resize_antialiased(small.astype(np.float32), 256, 256), 0, 1))
    assert np.abs(low - image).mean() > 0.005  # detail is lost
    # ... and what is left is what 64 px hold: a second round trip loses far less
    assert np.abs(degrade_resolution(low) - low).mean() < 0.5 * np.abs(low - image).mean()


def test_degraded_choice_is_seeded_and_sized() -> None:
    a = degraded_choice(40, 0.5, seed=3)
    assert len(a) == 20 and len(set(a.tolist())) == 20 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, degraded_choice(40, 0.5, seed=3))
    assert not np.array_equal(a, degraded_choice(40, 0.5, seed=4))
    assert len(degraded_choice(40, 0.0, seed=3)) == 0
    with pytest.raises(TrainingError, match="--degrade64 must be in"):
        Recipe(degrade64=1.0)
    assert "degrade64" not in Recipe().to_dict()  # older runs' recipes read the same
    assert Recipe.from_dict(Recipe(degrade64=0.25).to_dict()).degrade64 == 0.25


def test_cv_degrades_training_rows_only(
    cxr14_dir: Path, tmp_path: Path, one_torch_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensors the fit loop trains on hold the 64 px round trip of the chosen images (and
    the clean tensor of the others); the held-out images each fold predicts are all clean."""
    from dicom_node.cli import main
    from training import cv as cv_module
    from training.splits import load_task_data
    from triage_core.imaging import load_image, to_tensor

    fitted: list[torch.Tensor] = []
    predicted: list[torch.Tensor] = []
    real_fit, real_predict = cv_module.fit, cv_module.predict_logits

    def recording_fit(recipe: Recipe, images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        fitted.append(images.clone())
        return real_fit(recipe, images, *args, **kwargs)

    def recording_predict(model: Any, images: torch.Tensor, **kwargs: Any) -> Any:
        predicted.append(images.clone())
        return real_predict(model, images, **kwargs)

    monkeypatch.setattr(cv_module, "fit", recording_fit)
    monkeypatch.setattr(cv_module, "predict_logits", recording_predict)
    size, images = 96, 40  # above 64 px, so that the round trip shows
    argv = [
        "train", "--cv", "2", "--images", str(cxr14_dir / "256"), "--labels",
        str(cxr14_dir / "labels.csv"), "--max-images", str(images), "--image-size", str(size),
        "--epochs", "1", "--ema", "0", "--pretrained", "none", "--threads", "1",
        "--no-progress", "--seed", "5", "--degrade64", "0.5", "--out", str(tmp_path / "cv"),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert summary["recipe"]["degrade64"] == 0.5 and summary["degraded_to_64px"] == 20
    from training.cli_compare import cv_report
    from training.model_card import _recipe_text

    assert "50% of the main training images shown at 64 px" in _recipe_text(summary["recipe"])
    assert "50% of the training images at 64 px and back" in cv_report([tmp_path / "cv"])

    data, index = load_task_data(cxr14_dir / "256", cxr14_dir / "labels.csv", "multilabel", 40, 0)
    spec = Recipe(image_size=size, pretrained="none").spec()
    paths = [index[r.image_index] for r in data.records]
    clean = [to_tensor(load_image(p), spec).half() for p in paths]
    low = [to_tensor(degrade_resolution(load_image(p)), spec).half() for p in paths]
    chosen = set(degraded_choice(images, 0.5, seed=5).tolist())
    folds = {}
    for line in (tmp_path / "cv" / "folds.csv").read_text().splitlines()[1:]:
        cells = line.split(",")
        folds[cells[0]] = int(cells[-1])
    fold = np.asarray([folds[r.image_index] for r in data.records])
    assert len(fitted) == 2 and len(predicted) >= 2
    for k in (0, 1):
        train = np.flatnonzero(fold != k)
        held = np.flatnonzero(fold == k)
        rows = fitted[k]
        assert len(rows) == len(train)
        degraded_rows = 0
        for row, i in zip(rows, train, strict=True):
            want = low[i] if i in chosen else clean[i]
            assert torch.equal(row, want)
            degraded_rows += i in chosen
            if i in chosen:
                assert not torch.equal(row, clean[i])
        assert 0 < degraded_rows < len(train)
        # held-out images: every prediction of fold k was made on the clean tensors
        held_clean = torch.stack([clean[i] for i in held])
        fold_predictions = [p for p in predicted if len(p) == len(held)]
        assert fold_predictions and any(torch.equal(p, held_clean) for p in fold_predictions)
        assert not any(
            torch.equal(p[j], low[i])
            for p in fold_predictions
            for j, i in enumerate(held)
            if i in chosen
        )

    # the shipped model's fit (--final-from) trains on the same degraded rows, all images
    from training import final as final_module

    final_fitted: list[torch.Tensor] = []
    real_final_fit = final_module.fit

    def recording_final_fit(recipe: Recipe, images: torch.Tensor, *args: Any, **kw: Any) -> Any:
        final_fitted.append(images.clone())
        return real_final_fit(recipe, images, *args, **kw)

    monkeypatch.setattr(final_module, "fit", recording_final_fit)
    final = [
        "train", "--final-from", str(tmp_path / "cv"), "--images", str(cxr14_dir / "256"),
        "--labels", str(cxr14_dir / "labels.csv"), "--variant", "final", "--threads", "1",
        "--no-progress", "--out", str(tmp_path / "final"),
    ]  # fmt: skip
    assert main(final) == 0
    (rows,) = final_fitted
    assert len(rows) == images
    for i, row in enumerate(rows):
        assert torch.equal(row, low[i] if i in chosen else clean[i])
