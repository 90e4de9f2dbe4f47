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

REPO = Path(__file__).resolve().parents[2]
RUN_FILES = REPO / "docs" / "model"


def test_shipped_checkpoint_is_small_lite0_from_imagenet() -> None:
    from safetensors import safe_open

    path = default_checkpoint_path()
    assert path.name == DEFAULT_CHECKPOINT_NAME == "cxr-triage-lite0-multilabel"
    weights, spec_file = checkpoint_paths(path)
    assert weights.stat().st_size <= 16 * 2**20
    model, spec = load_checkpoint(path)
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    floating = [t for t in tensors.values() if t.is_floating_point()]
    check = spec.training["fp16_check"]
    assert check["images"] == spec.training["data"]["n_images"] >= 643
    if spec.training["weights_dtype"] == "float16":
        # weights of two or more dimensions fp16 (the 1-D tensors too in checkpoints written
        # before they were kept fp32), only where that moves no probability by more than the
        # tolerance (v2 was checked before the tolerance was recorded: 0.01)
        assert check["max_abs_probability_difference"] <= check.get("tolerance", 0.01) == 0.01
        assert all(str(t.dtype) == "torch.float16" for t in floating if t.dim() >= 2)
    else:  # fp32 because fp16 would have changed the served probabilities
        assert spec.training["weights_dtype"] == "float32"
        assert check["max_abs_probability_difference"] > check["tolerance"] == 0.01
        assert all(str(t.dtype) == "torch.float32" for t in floating)
    assert spec.arch == "efficientnet_lite0" and spec.task == "multilabel"
    assert spec.input_size == spec.training["recipe"]["image_size"]
    assert spec.training["pretrained"]["kind"] == "imagenet"
    assert spec.training["pretrained"]["sha256"].startswith("57934424")
    # fixed epoch count, no early stopping: every epoch of the recipe was run
    assert len(spec.training["history"]) == spec.training["recipe"]["epochs"]
    assert json.loads(spec_file.read_text())["name"] == DEFAULT_CHECKPOINT_NAME
    assert spec.ood, "the shipped spec carries the out-of-distribution reference"
    assert spec.drift["bins"] == 20 and set(spec.drift["classes"]) == set(spec.class_names)


def test_shipped_operating_points_keep_the_urgent_share_bounded() -> None:
    spec = read_spec(default_checkpoint_path())
    points = spec.metrics["operating_points"]
    assert points["images"] == spec.training["data"]["n_images"]
    assert points["urgent_share"] <= 1.5 * points["any_finding_share"]
    for name, t in zip(spec.class_names, spec.thresholds, strict=True):
        p = points[name]
        assert p["threshold"] == pytest.approx(t, abs=1e-6)
        for metric in ("sensitivity", "specificity", "ppv"):
            point, low, high = p[metric]
            assert 0 <= low <= point <= high <= 1, (name, metric)
        assert p["sensitivity"][0] > 1 - p["specificity"][0], name  # better than a coin


@pytest.mark.xfail(
    strict=True,
    reason="issue 14's done-when target is not reached on the shared data: see MODEL_CARD.md "
    "(OOF mean AUROC and the lowest class)",
)
def test_shipped_recipe_reaches_the_issue_14_target() -> None:
    oof = read_spec(default_checkpoint_path()).metrics["oof"]
    assert oof["mean_auroc"][0] >= 0.75
    assert min(v[0] for v in oof["auroc"].values()) >= 0.68


@pytest.mark.xfail(
    strict=True,
    reason="issue 23's done-when target (OOF mean AUROC >= 0.72 on the enlarged shared set, no "
    "class below 0.65) is not reached: v3 (run F) scores 0.644, see MODEL_CARD.md",
)
def test_shipped_model_reaches_the_issue_23_target() -> None:
    spec = read_spec(default_checkpoint_path())
    assert spec.training["data"]["n_images"] >= 2134  # the enlarged set
    oof = spec.metrics["oof"]
    assert oof["mean_auroc"][0] >= 0.72
    assert min(v[0] for v in oof["auroc"].values()) >= 0.65


def test_model_card_numbers_equal_the_run_files() -> None:
    """Every OOF figure of the spec is recomputed from the run's committed files
    (docs/model/oof.csv: the shipped recipe's out-of-fold logits; docs/model/cv_runs.json:
    every CV run's table), and the card is the generator's output for them."""
    from training import oof
    from training.calibrate import fit_temperature_and_shift, probabilities
    from training.model_card import render_model_card
    from training.runs import read_oof

    path = default_checkpoint_path()
    spec = read_spec(path)
    variant = spec.training["variant"]
    _, patients, y, logits = read_oof(RUN_FILES / "oof.csv")
    z = logits[variant]
    metrics = spec.metrics
    auroc = oof.patient_bootstrap(y, z, patients)
    assert metrics["oof"]["mean_auroc"] == auroc["mean"]
    assert list(metrics["oof"]["auroc"].values()) == auroc["per_class"]
    temperature, shift = fit_temperature_and_shift(z, y)
    assert spec.temperature == pytest.approx(temperature, rel=1e-6)
    assert metrics["oof"]["logit_shift"] == pytest.approx(shift.tolist(), abs=1e-6)
    probs = probabilities(
        z + np.asarray(metrics["oof"]["logit_shift"]), "multilabel", spec.temperature
    )
    # the bound the shipped thresholds were fitted to (specs before issue 23 record none: 1.5)
    factor = metrics["operating_points"].get("urgent_bound_factor", 1.5)
    thresholds, rule = oof.choose_operating_thresholds(probs, y, factor)
    assert spec.thresholds == pytest.approx(tuple(thresholds)) and metrics["threshold_rule"] == rule
    points = oof.operating_points(
        probs, y, patients, spec.class_names, spec.thresholds, bound_factor=factor
    )
    if "urgent_ratio" not in metrics["operating_points"]:  # fitted before the ratio was kept
        del points["urgent_ratio"], points["urgent_bound_factor"]
    assert metrics["operating_points"] == points
    assert spec.drift == oof.drift_reference(probs, spec.thresholds, spec.class_names)
    runs = json.loads((RUN_FILES / "cv_runs.json").read_text())
    shipped = [r for r in runs if r["dir"] == spec.training["cv_run"]]
    assert len(shipped) == 1 and shipped[0]["variants"][variant]["mean"] == auroc["mean"]
    card_path = model_card_path(path)
    assert card_path is not None
    card = card_path.read_text()
    weights = checkpoint_paths(path)[0].stat().st_size
    assert card == render_model_card(spec, weights_bytes=weights, cv_runs=runs)
    assert "/work/" not in card and "/home/" not in card  # paths relative to the repository
    assert "../shared/data/cxr14/256" in card
    assert "not for clinical use" in card.lower()
    assert "text-mined" in card and "shortcut" in card.lower()
    assert "triage train --cv 5" in card and "--final-from" in card


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
