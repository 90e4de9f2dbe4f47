"""The default checkpoint shipped in triage_core/weights: size, spec, card, reproducible metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from triage_core.models import (
    DEFAULT_CHECKPOINT_NAME,
    checkpoint_paths,
    default_checkpoint_path,
    load_checkpoint,
    model_card_path,
)


def test_shipped_checkpoint_is_small_fp16_and_documented() -> None:
    from safetensors import safe_open

    path = default_checkpoint_path()
    assert path.name == DEFAULT_CHECKPOINT_NAME
    weights, spec_file = checkpoint_paths(path)
    assert weights.stat().st_size <= 10 * 2**20
    with safe_open(str(weights), framework="pt") as handle:
        dtypes = {str(handle.get_tensor(k).dtype) for k in handle.keys()}  # noqa: SIM118
    assert "torch.float16" in dtypes and "torch.float32" not in dtypes
    model, spec = load_checkpoint(path)
    assert next(model.parameters()).dtype.is_floating_point
    assert spec.arch == "efficientnet_b0" and spec.task == "multilabel"
    assert spec.training["weights_dtype"] == "float16"
    assert spec.training["fp16_check"]["max_abs_probability_difference"] <= 0.01
    assert spec.training["data"]["split"]["sizes"]["test"] > 100
    test = spec.metrics["test"]
    card_path = model_card_path(path)
    assert card_path is not None
    card = card_path.read_text()
    # the card quotes the spec's test numbers and the limitations plainly
    for name, row in test["per_class"].items():
        assert f"{row['auroc']:.3f}" in card, name
    assert "not for clinical use" in card.lower()
    assert "imagenet" in card.lower() and "text-mined" in card.lower()
    assert re.search(r"triage train .*--arch efficientnet_b0", card)
    assert json.loads(spec_file.read_text())["name"] == DEFAULT_CHECKPOINT_NAME


def test_shipped_checkpoint_reproduces_its_test_metrics(cxr14_dir: Path, tmp_path: Path) -> None:
    import torch

    from training.evaluate import evaluate_checkpoint

    torch.set_num_threads(1)
    path = default_checkpoint_path()
    _, spec = load_checkpoint(path)
    metrics = evaluate_checkpoint(
        path, cxr14_dir / "256", cxr14_dir / "labels.csv", tmp_path, n_boot=0, cam_images=0
    )
    recorded = spec.metrics["test"]
    assert metrics["images"] == recorded["images"]
    for name, row in recorded["per_class"].items():
        assert metrics["per_class"][name]["auroc"] == pytest.approx(row["auroc"], abs=0.01)


def test_triage_predict_without_model_uses_the_shipped_checkpoint(
    dicom_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import main

    chest = dicom_dir / "RG1_UNCR.dcm"
    assert main(["predict", str(chest), "--threads", "1"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert rows[0]["model"]["name"] == DEFAULT_CHECKPOINT_NAME
    probs = np.array(list(rows[0]["probabilities"].values()))
    assert probs.shape == (3,) and ((probs >= 0) & (probs <= 1)).all()
