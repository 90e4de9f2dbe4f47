"""Patient-wise cross-validation (training.cv), OOF statistics (training.oof) and the shipped
model's fit from a CV run (training.final), on real NIH images read in place.

Models here are tiny (32-64 px, 80 images, 1-2 epochs): they test the protocol's plumbing
(folds, resume, pooling, calibration on OOF), not clinical quality.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from training import oof
from training.cv import CVConfig, Recipe, fit, patient_folds, recipe_spec, run_cv
from training.loop import TrainingError
from training.splits import load_task_data

IMAGES = 80
TINY = Recipe(image_size=32, epochs=2, batch_size=16, ema=0.9, seed=1)


def test_patient_folds_keep_patients_together_and_stratify(cxr14_dir: Path) -> None:
    data, _ = load_task_data(cxr14_dir / "256", cxr14_dir / "labels.csv", "multilabel")
    fold = patient_folds(data, 5, seed=0)
    assert sorted(set(fold.tolist())) == [0, 1, 2, 3, 4]
    by_patient: dict[str, set[int]] = defaultdict(set)
    for record, f in zip(data.records, fold, strict=True):
        by_patient[record.patient_id].add(int(f))
    assert all(len(v) == 1 for v in by_patient.values())  # no patient in two folds
    y = data.multi_hot()
    for c in range(y.shape[1]):
        per_fold = [y[fold == k, c].sum() for k in range(5)]
        assert max(per_fold) - min(per_fold) <= 4, per_fold  # stratified on the findings
    assert np.array_equal(fold, patient_folds(data, 5, seed=0))  # seeded
    assert not np.array_equal(fold, patient_folds(data, 5, seed=1))
    with pytest.raises(TrainingError, match="--cv must be >= 2"):
        patient_folds(data, 1, seed=0)


def test_patient_bootstrap_resamples_patients_not_images() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((60, 2)) < 0.4).astype(float)
    y[0] = [1, 1]
    y[1] = [0, 0]
    s = y + rng.normal(0, 0.8, y.shape)
    patients = [f"p{i}" for i in range(60)]
    single = oof.patient_bootstrap(y, s, patients, n_boot=300)
    # every patient imaged 5 times with the same score: a patient resample draws the same
    # patients with the same seed, so the intervals are those of the one-image data; an image
    # bootstrap would call the 300 images independent and narrow them
    rep = oof.patient_bootstrap(
        np.repeat(y, 5, axis=0), np.repeat(s, 5, axis=0), np.repeat(patients, 5), n_boot=300
    )
    assert rep["per_class"] == single["per_class"] and rep["mean"] == single["mean"]
    low, high = single["mean"][1], single["mean"][2]
    assert low < single["mean"][0] < high and high - low > 0.05


def test_thresholds_keep_the_urgent_share_under_its_bound() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((400, 3)) < 0.12).astype(float)
    probs = np.clip(0.35 + 0.2 * y + rng.normal(0, 0.15, y.shape), 0, 1)
    youden = [oof.youden_threshold(y[:, k], probs[:, k]) for k in range(3)]
    thresholds, rule = oof.choose_operating_thresholds(probs, y)
    urgent = (probs >= np.asarray(thresholds)).any(axis=1).mean()
    assert urgent <= 1.5 * y.any(axis=1).mean() + 1e-9
    assert all(t >= u for t, u in zip(thresholds, youden, strict=True))
    points = oof.operating_points(probs, y, [str(i) for i in range(400)], "ABC", thresholds)
    assert points["urgent_share"] == pytest.approx(urgent, abs=1e-4)
    a = points["A"]
    called = probs[:, 0] >= thresholds[0]
    assert a["sensitivity"][0] == pytest.approx(called[y[:, 0] > 0].mean(), abs=1e-4)
    assert a["specificity"][1] <= a["specificity"][0] <= a["specificity"][2]
    ref = oof.drift_reference(probs, thresholds, "ABC")
    assert ref["bins"] == 20 and sum(ref["classes"]["B"]["histogram"]) == pytest.approx(1.0)
    assert ref["classes"]["A"]["positive_share"] == pytest.approx(called.mean(), abs=1e-6)


def test_fit_resumes_an_interrupted_run_to_the_same_weights(
    cxr14_dir: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    from training.data import load_tensors

    data, index = load_task_data(
        cxr14_dir / "256", cxr14_dir / "labels.csv", "multilabel", 24, seed=0
    )
    spec = recipe_spec(TINY)
    images = load_tensors([index[r.image_index] for r in data.records], spec)
    whole, _, _ = fit(TINY, images, data.multi_hot(), spec)

    class Stop(Exception):
        pass

    def stop_after_first(epoch: int, _model: torch.nn.Module) -> None:
        if epoch == 1:
            raise Stop

    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        fit(TINY, images, data.multi_hot(), spec, state_path=state, on_epoch=stop_after_first)
    assert state.exists()
    seen: list[int] = []
    resumed, _, history = fit(
        TINY, images, data.multi_hot(), spec, state_path=state, on_epoch=lambda e, m: seen.append(e)
    )
    assert seen == [2] and [h["epoch"] for h in history] == [1, 2]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = Recipe(**{**TINY.to_dict(), "crop": (0.9, 1.0), "lr": 1e-3})
    with pytest.raises(TrainingError, match="another recipe"):
        fit(other, images, data.multi_hot(), spec, state_path=state)


@pytest.fixture(scope="module")
def tiny_cv(cxr14_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cv")
    config = CVConfig(
        images=cxr14_dir / "256",
        labels=cxr14_dir / "labels.csv",
        out=out,
        recipe=TINY,
        folds=2,
        max_images=IMAGES,
        progress=False,
        only_folds=(0,),
    )
    with pytest.raises(TrainingError, match="fold 1 .* is not finished"):
        run_cv(config)  # fold 0 only: the pooled table needs every fold
    done = (out / "fold0" / "predictions.npz").stat().st_mtime_ns
    config.only_folds = None
    run_cv(config)  # resumes: fold 0 is kept as it is, fold 1 runs
    assert (out / "fold0" / "predictions.npz").stat().st_mtime_ns == done
    return out


def test_cv_writes_out_of_fold_predictions_for_every_image(tiny_cv: Path) -> None:
    with (tiny_cv / "folds.csv").open() as handle:
        folds = {
            r["Image Index"]: (r["Patient ID"], int(r["fold"])) for r in csv.DictReader(handle)
        }
    images, patients, labels, logits = oof.read_oof(tiny_cv / "oof.csv")
    assert len(images) == IMAGES and set(images) == set(folds)
    assert {"final", "final_tta", "ema", "ema_tta", "epoch1", "epoch2"} <= set(logits)
    assert np.array_equal(logits["final"], logits["epoch2"])  # the last epoch is the final
    assert all(np.isfinite(v).all() for v in logits.values())
    for k in (0, 1):  # each fold's model was trained on the other fold's patients only
        held = np.load(tiny_cv / f"fold{k}" / "predictions.npz")["index"]
        held_patients = {patients[i] for i in held}
        trained_on = {p for p, f in folds.values() if f != k}
        assert held_patients and not held_patients & trained_on
    summary = json.loads((tiny_cv / "cv.json").read_text())
    assert summary["data"]["images"] == IMAGES and summary["folds"] == 2
    again = oof.patient_bootstrap(labels, logits["ema"], patients)
    assert summary["variants"]["ema"] == again
    assert summary["images"].startswith("../shared/data/") or "shared" not in summary["images"]


def test_final_model_is_calibrated_on_the_out_of_fold_predictions(
    tiny_cv: Path, cxr14_dir: Path, tmp_path: Path
) -> None:
    from training.calibrate import fit_temperature_and_shift, probabilities
    from training.final import train_final
    from triage_core.models import load_checkpoint

    summary = json.loads((tiny_cv / "cv.json").read_text())
    path = train_final(
        tiny_cv,
        tmp_path,
        variant="ema",
        name="tiny",
        images=cxr14_dir / "256",
        labels=cxr14_dir / "labels.csv",
    )
    with pytest.raises(TrainingError, match="--variant"):
        train_final(tiny_cv, tmp_path, variant="ema_tta")
    model, spec = load_checkpoint(path)
    _, patients, y, logits = oof.read_oof(tiny_cv / "oof.csv")
    temperature, shift = fit_temperature_and_shift(logits["ema"], y)
    assert spec.temperature == pytest.approx(temperature)
    assert spec.metrics["oof"]["logit_shift"] == pytest.approx(shift.tolist(), abs=1e-6)
    probs = probabilities(logits["ema"] + shift, "multilabel", temperature)
    thresholds, _ = oof.choose_operating_thresholds(probs, y)
    assert spec.thresholds == pytest.approx(tuple(thresholds))
    assert spec.drift == oof.drift_reference(probs, thresholds, spec.class_names)
    assert (
        spec.metrics["oof"]["mean_auroc"]
        == oof.patient_bootstrap(y, logits["ema"], patients)["mean"]
    )
    assert spec.training["recipe"] == summary["recipe"]
    assert spec.training["fp16_check"]["max_abs_probability_difference"] <= 0.01
    assert [h["epoch"] for h in spec.training["history"]] == [1, 2]  # fixed epochs, no stopping
    assert (
        spec.metrics["operating_points"]["urgent_share"]
        <= (spec.metrics["operating_points"]["urgent_bound"])
    )
    assert spec.ood and spec.input_size == 32
    assert not (tmp_path / "state.pt").exists()


def test_resnet18_and_b0_run_the_same_cv_and_compare_tabulates_them(
    cxr14_dir: Path, tmp_path: Path, tiny_cv: Path, one_torch_thread: None
) -> None:
    from training.cli_compare import cv_report

    dirs = [tiny_cv]
    for arch, pretrained in (("resnet18", "none"), ("efficientnet_b0", "imagenet")):
        out = tmp_path / arch
        recipe = Recipe(
            arch=arch, image_size=32, epochs=1, batch_size=16, ema=0.0, pretrained=pretrained
        )
        summary = run_cv(
            CVConfig(
                images=cxr14_dir / "256",
                labels=cxr14_dir / "labels.csv",
                out=out,
                recipe=recipe,
                folds=2,
                max_images=IMAGES,
                progress=False,
            )
        )
        assert summary["recipe"]["arch"] == arch and "ema" not in summary["variants"]
        assert (out / "fold1" / "model.safetensors").exists()
        dirs.append(out)
    text = cv_report(dirs)
    for arch in ("efficientnet_lite0", "resnet18", "efficientnet_b0"):
        assert f"| {arch} (" in text
    assert "Seed study" in text and "efficientnet_b0: accuracy 0.762" in text
