"""The default checkpoint shipped in triage_core/weights: size, spec, card, reproducible metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from triage_core.models import (
    DEFAULT_CHECKPOINT_NAME,
    checkpoint_paths,
    default_checkpoint_path,
    load_checkpoint,
    model_card_path,
    read_spec,
)


def test_shipped_checkpoint_is_small_fp16_lite0_from_imagenet() -> None:
    from safetensors import safe_open

    path = default_checkpoint_path()
    assert path.name == DEFAULT_CHECKPOINT_NAME == "cxr-triage-lite0-multilabel"
    weights, spec_file = checkpoint_paths(path)
    assert weights.stat().st_size <= 10 * 2**20
    with safe_open(str(weights), framework="pt") as handle:
        dtypes = {str(handle.get_tensor(k).dtype) for k in handle.keys()}  # noqa: SIM118
    assert "torch.float16" in dtypes and "torch.float32" not in dtypes
    model, spec = load_checkpoint(path)
    assert spec.arch == "efficientnet_lite0" and spec.task == "multilabel"
    assert spec.input_size == 224 and spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert spec.training["pretrained"]["kind"] == "imagenet"
    assert spec.training["pretrained"]["sha256"].startswith("57934424")
    assert spec.training["weights_dtype"] == "float16"
    assert spec.training["fp16_check"]["max_abs_probability_difference"] <= 0.01
    assert spec.training["data"]["split"]["sizes"]["test"] > 100
    assert json.loads(spec_file.read_text())["name"] == DEFAULT_CHECKPOINT_NAME
    assert spec.ood, "the shipped spec carries the out-of-distribution reference"
    # better than the random-init default it replaced (test mean AUROC 0.532 on this split)
    assert spec.metrics["test"]["mean_auroc"] > 0.55


@pytest.mark.xfail(
    strict=True,
    reason="issue 8's done-when target is not reached: test mean AUROC 0.579, every class "
    "below 0.60 (see MODEL_CARD.md)",
)
def test_shipped_checkpoint_reaches_the_issue_8_target() -> None:
    test = read_spec(default_checkpoint_path()).metrics["test"]
    assert test["mean_auroc"] >= 0.75
    assert min(row["auroc"] for row in test["per_class"].values()) >= 0.68


def test_model_card_numbers_equal_a_fresh_evaluation(cxr14_dir: Path, tmp_path: Path) -> None:
    """Evaluate the shipped file on its test split now; every test figure of the card (AUROC
    with its bootstrap interval, ECE before and after, the operating points) must be this
    evaluation's, and the card must be the generator's output for the spec."""
    from training.evaluate import evaluate_checkpoint
    from training.model_card import auroc_cell, render_operating_points

    path = default_checkpoint_path()
    spec = read_spec(path)
    card_path = model_card_path(path)
    assert card_path is not None
    card = card_path.read_text()
    fresh = evaluate_checkpoint(
        path, cxr14_dir / "256", cxr14_dir / "labels.csv", tmp_path, n_boot=1000, cam_images=0
    )
    assert fresh["images"] == spec.metrics["test"]["images"]
    for name in spec.class_names:
        row = fresh["per_class"][name]
        assert f"| {name} | {auroc_cell(row)} | {row['support']} |" in card, name
    assert f"Mean AUROC {fresh['mean_auroc']:.3f}" in card
    assert f"| test | {fresh['ece_before']:.3f} | {fresh['ece_after']:.3f} |" in card
    for line in render_operating_points(spec, fresh):
        assert line in card, line
    assert "not for clinical use" in card.lower()
    assert "text-mined" in card and "shortcut" in card.lower()
    assert "triage train" in card and "--threads" in card


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
