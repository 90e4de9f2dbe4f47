"""Patient-wise cross-validation (training.cv), its run files (training.runs), OOF statistics
(training.oof), the one fit loop (training.fit) and the shipped model's fit from a CV run
(training.final), on real NIH images read in place.

Models here are tiny (32-64 px, 80 images, 1-2 epochs): they test the protocol's plumbing
(folds, resume, pooling, calibration on OOF), not clinical quality.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training import oof
from training.cv import CVConfig, patient_folds, run_cv
from training.fit import fit
from training.recipe import Recipe, TrainingError
from training.runs import read_oof
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
    from training.state import load_state

    data, index = load_task_data(
        cxr14_dir / "256", cxr14_dir / "labels.csv", "multilabel", 24, seed=0
    )
    spec = TINY.spec()
    images = load_tensors([index[r.image_index] for r in data.records], spec)
    whole = fit(TINY, images, data.multi_hot(), spec, fingerprint="a")

    class Stop(Exception):
        pass

    def stop_after_first(epoch: int, _model: torch.nn.Module) -> None:
        if epoch == 1:
            raise Stop

    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        fit(
            TINY,
            images,
            data.multi_hot(),
            spec,
            state_path=state,
            fingerprint="a",
            on_epoch=stop_after_first,
        )
    saved = load_state(state)
    assert saved["epoch"] == 1 and saved["world_size"] == 1
    saved_steps = int(next(iter(saved["optimizer"]["state"].values()))["step"])
    assert saved_steps == whole.optimizer_steps // 2 > 0
    seen: list[int] = []
    resumed = fit(
        TINY,
        images,
        data.multi_hot(),
        spec,
        state_path=state,
        fingerprint="a",
        on_epoch=lambda e, m: seen.append(e),
    )
    assert seen == [2] and resumed.start_epoch == 1
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    # the optimizer continued: one more epoch of steps on top of the saved count
    assert resumed.optimizer_steps == whole.optimizer_steps == 2 * saved_steps
    for (k, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    assert load_state(state)["epoch"] == 2
    # a state of another recipe or other data is refused, and so is a file that is no state
    other = Recipe(**{**TINY.to_dict(), "crop": (0.9, 1.0), "lr": 1e-3})
    with pytest.raises(TrainingError, match="another recipe"):
        fit(other, images, data.multi_hot(), spec, state_path=state, fingerprint="a")
    with pytest.raises(TrainingError, match="other training data"):
        fit(TINY, images, data.multi_hot(), spec, state_path=state, fingerprint="b")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match="not a readable training state"):
        fit(TINY, images, data.multi_hot(), spec, state_path=tmp_path / "junk.pt")


def test_same_seed_same_weights(cxr14_dir: Path, one_torch_thread: None) -> None:
    from training.data import load_tensors

    data, index = load_task_data(
        cxr14_dir / "256", cxr14_dir / "labels.csv", "multilabel", 24, seed=0
    )
    recipe = Recipe(arch="resnet18", image_size=32, epochs=1, batch_size=8, ema=0.0, seed=5)
    spec = recipe.spec()
    images = load_tensors([index[r.image_index] for r in data.records], spec)
    runs = [
        fit(r, images, data.multi_hot(), spec).model.state_dict()
        for r in (recipe, recipe, Recipe(**{**recipe.to_dict(), "seed": 6, "crop": None}))
    ]
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # reproducible
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # seed matters
    # DataLoader workers change nothing: each epoch's augmentation is a function of the seed,
    # the epoch and the index, also inside worker processes (two epochs: set_epoch reaches them)
    two = Recipe(**{**recipe.to_dict(), "epochs": 2})
    plain = fit(two, images, data.multi_hot(), spec).model.state_dict()
    pooled = fit(two, images, data.multi_hot(), spec, workers=1).model.state_dict()
    assert all(torch.equal(plain[k], pooled[k]) for k in plain)


def test_recipe_is_checked_when_built() -> None:
    with pytest.raises(TrainingError, match="--task must be one of"):
        Recipe(task="multitask")
    with pytest.raises(TrainingError, match="--arch must be one of"):
        Recipe(arch="vgg")
    with pytest.raises(TrainingError, match="--epochs must be >= 1"):
        Recipe(epochs=0)
    with pytest.raises(TrainingError, match="--crop"):
        Recipe(crop=(0.9, 0.5))
    with pytest.raises(TrainingError, match="--init-from"):
        Recipe(init_from="x", head_init="probe")
    assert Recipe(epochs=0, head_init="probe").epochs == 0
    assert Recipe(arch="resnet18").pretrained == "none"  # no ImageNet weights here
    assert Recipe().pretrained == "imagenet"
    old = {k: v for k, v in TINY.to_dict().items() if k not in ("task", "init_from")}
    assert Recipe.from_dict(old) == TINY  # a cv.json from before the task field


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
    images, patients, labels, logits = read_oof(tiny_cv / "oof.csv")
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


@pytest.fixture(scope="module")
def tiny_final(tiny_cv: Path, cxr14_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped-model fit of ``tiny_cv`` (``triage train --final-from``)."""
    from training.final import train_final

    torch.set_num_threads(1)
    return train_final(
        tiny_cv,
        tmp_path_factory.mktemp("final"),
        variant="ema",
        name="tiny",
        images=cxr14_dir / "256",
        labels=cxr14_dir / "labels.csv",
    )


def test_final_model_is_calibrated_on_the_out_of_fold_predictions(
    tiny_cv: Path, tiny_final: Path
) -> None:
    from training.calibrate import fit_temperature_and_shift, probabilities
    from training.final import train_final
    from triage_core.models import load_checkpoint

    summary = json.loads((tiny_cv / "cv.json").read_text())
    with pytest.raises(TrainingError, match="--variant"):
        train_final(tiny_cv, tiny_final.parent, variant="ema_tta")
    model, spec = load_checkpoint(tiny_final)
    _, patients, y, logits = read_oof(tiny_cv / "oof.csv")
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
    points = spec.metrics["operating_points"]
    assert points["urgent_share"] <= points["urgent_bound"]
    assert points["urgent_bound_factor"] == oof.URGENT_BOUND == 1.3  # the default bound
    assert points["urgent_ratio"][0] <= 1.3 + 1e-4
    assert spec.ood and spec.input_size == 32 and spec.code_version
    assert 0 < spec.temperature and all(0.0 <= t <= 1.0 for t in spec.thresholds)
    assert not (tiny_final.parent / "state.pt").exists()
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_final_takes_an_urgent_bound(
    tiny_cv: Path, cxr14_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--urgent-bound 1.1`: thresholds, spec and card follow it; with --cv it is refused."""
    from dicom_node.cli import main
    from training.model_card import render_model_card
    from triage_core.models import read_spec

    data = ["--images", str(cxr14_dir / "256"), "--labels", str(cxr14_dir / "labels.csv")]
    argv = ["train", "--final-from", str(tiny_cv), *data, "--threads", "1", "--no-progress"]
    assert main([*argv, "--urgent-bound", "1.1", "--name", "b", "--out", str(tmp_path)]) == 0
    spec = read_spec(tmp_path / "b")
    points = spec.metrics["operating_points"]
    assert points["urgent_bound_factor"] == 1.1
    assert points["urgent_share"] <= 1.1 * points["any_finding_share"] + 1e-4
    ratio, low, high = points["urgent_ratio"]
    assert ratio <= 1.1 + 1e-4 and low <= ratio <= high
    assert "1.1 x the share with any finding" in spec.metrics["threshold_rule"] or (
        ratio <= 1.1 and "scaled" not in spec.metrics["threshold_rule"]
    )
    card = render_model_card(spec, weights_bytes=1)
    assert "Ratio of the two:" in card and "<= 1.1" in card
    assert main(["train", "--cv", "2", *data, "--urgent-bound", "1.2", "--out", "x"]) == 2
    assert "--urgent-bound is a --final-from option" in capsys.readouterr().err


def test_triage_predict_uses_the_final_checkpoint(
    tiny_final: Path, cxr14_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import main
    from training.calibrate import probabilities
    from training.data import load_tensors
    from training.predict import predict_logits
    from triage_core.models import load_checkpoint

    image = sorted((cxr14_dir / "256").glob("*.png"))[0]
    assert main(["predict", str(image), "--model", str(tiny_final), "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(rows) == 1 and rows[0]["eligible"] is True
    assert rows[0]["model"]["name"] == "tiny"
    # the same probabilities as the training code's own forward pass (imaging.to_tensor)
    model, spec = load_checkpoint(tiny_final)
    probs = probabilities(
        predict_logits(model, load_tensors([image], spec)), spec.task, spec.temperature
    )[0]
    got = np.array([rows[0]["probabilities"][n] for n in spec.class_names])
    assert np.allclose(got, probs, atol=0.03)  # predict may run bf16 on CPU


def test_evaluate_scores_every_labelled_image_and_equals_sklearn(
    tiny_final: Path, cxr14_dir: Path, tmp_path: Path, sklearn_check: Any
) -> None:
    from training.data import DatasetError
    from training.evaluate import evaluate_checkpoint
    from triage_core.models import read_spec

    spec = read_spec(tiny_final)
    rows = (cxr14_dir / "labels.csv").read_text().splitlines()
    subset = tmp_path / "subset.csv"  # an "external" labelled set: every 20th row
    subset.write_text("\n".join(rows[:1] + rows[1::20]) + "\n")
    metrics = evaluate_checkpoint(
        tiny_final, cxr14_dir / "256", subset, tmp_path / "eval", n_boot=100, cam_images=2
    )
    assert metrics["split"] == "all" and metrics["images"] == len(rows[1::20])
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["macro_f1"] == metrics["macro_f1"]
    sklearn_check(tmp_path / "eval", on_disk, spec.class_names)
    for plot in ("roc.png", "reliability.png", "cam_grid.png"):
        assert (tmp_path / "eval" / plot).stat().st_size > 1000
    assert "ece_before" in on_disk and "ece_after" in on_disk
    # a checkpoint of the one flow records no single split: no test split to rebuild
    with pytest.raises(DatasetError, match="records no training split"):
        evaluate_checkpoint(tiny_final, cxr14_dir / "256", subset, tmp_path / "x", split="test")


def test_an_interrupted_fold_resumes_to_the_uninterrupted_weights(
    cxr14_dir: Path, tmp_path: Path, tiny_cv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same run as ``tiny_cv``, killed after fold 1's first epoch and rerun: fold 0 is
    skipped, fold 1 resumes from its state and ends with the same weights and OOF logits."""
    from safetensors.torch import load_file

    import training.fit

    torch.set_num_threads(1)

    class Killed(Exception):
        pass

    real_save = training.fit.save_state

    def save_then_die(path: Path, state: dict) -> None:  # type: ignore[type-arg]
        real_save(path, state)
        if path.parent.name == "fold1":
            raise Killed

    config = CVConfig(
        images=cxr14_dir / "256",
        labels=cxr14_dir / "labels.csv",
        out=tmp_path,
        recipe=TINY,
        folds=2,
        max_images=IMAGES,
        progress=False,
    )
    monkeypatch.setattr(training.fit, "save_state", save_then_die)
    with pytest.raises(Killed):
        run_cv(config)
    monkeypatch.undo()
    assert (tmp_path / "fold0" / "predictions.npz").is_file()
    assert (tmp_path / "fold1" / "state.pt").is_file()
    assert not (tmp_path / "fold1" / "predictions.npz").exists()
    done = (tmp_path / "fold0" / "predictions.npz").stat().st_mtime_ns
    run_cv(config)
    assert (tmp_path / "fold0" / "predictions.npz").stat().st_mtime_ns == done
    assert not (tmp_path / "fold1" / "state.pt").exists()
    for name in ("model", "model_ema"):
        a = load_file(str(tmp_path / "fold1" / f"{name}.safetensors"))
        b = load_file(str(tiny_cv / "fold1" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b), name
    resumed, uninterrupted = read_oof(tmp_path / "oof.csv")[3], read_oof(tiny_cv / "oof.csv")[3]
    for variant in ("final", "ema", "ema_tta"):
        assert np.allclose(resumed[variant], uninterrupted[variant], atol=1e-6), variant
    # the per-epoch snapshot before the interruption is lost (only informative)
    assert (
        np.isnan(resumed["epoch1"]).any()
        and "epoch1" not in json.loads((tmp_path / "cv.json").read_text())["variants"]
    )


def test_init_from_starts_every_fold_from_the_checkpoint(
    cxr14_dir: Path,
    tmp_path: Path,
    tiny_cv: Path,
    one_torch_thread: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dicom_node.cli import main
    from training.fit import build_model
    from training.predict import classifier_layer
    from triage_core.models import load_checkpoint

    start = tiny_cv / "fold0" / "model"  # a Lite0 multilabel checkpoint at 32 px
    recipe = Recipe(image_size=32, epochs=1, batch_size=16, ema=0.0, init_from=str(start))
    built = build_model(recipe, 3)
    saved, _ = load_checkpoint(start)
    pairs = zip(built.state_dict().values(), saved.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    data = ["--images", str(cxr14_dir / "256"), "--labels", str(cxr14_dir / "labels.csv")]
    common = [
        "train", "--cv", "2", *data, "--max-images", str(IMAGES), "--image-size", "32",
        "--epochs", "1", "--ema", "0", "--lr", "1e-12", "--threads", "1", "--no-progress",
        "--init-from", str(start),
    ]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "cv")]) == 0
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert summary["recipe"]["init_from"] == str(start)
    # with a vanishing learning rate each fold's head is still the checkpoint's head
    fold, _ = load_checkpoint(tmp_path / "cv" / "fold1" / "model")
    a, b = classifier_layer(fold).weight, classifier_layer(saved).weight
    assert torch.allclose(a, b, atol=1e-3)
    # another architecture than the checkpoint's is refused, loudly
    assert main([*common, "--arch", "resnet18", "--out", str(tmp_path / "r")]) == 2
    assert "is efficientnet_lite0/multilabel, not resnet18/multilabel" in capsys.readouterr().err


def test_extra_sources_never_include_a_held_out_patient(cxr14_dir: Path, tmp_path: Path) -> None:
    from training.recipe import Source
    from training.sources import load_extra

    data, _ = load_task_data(cxr14_dir / "256", cxr14_dir / "labels.csv", "multilabel")
    fold = patient_folds(data, 5, seed=0)
    main_patients = {r.patient_id for r in data.records}
    # a small extra source: 64 px images, half of them of patients in the main data
    lines = (cxr14_dir / "lowres64" / "labels.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    pid = header.split(",").index("Patient ID")
    shared = [r for r in rows if r.split(",")[pid] in main_patients][:20]
    other = [r for r in rows if r.split(",")[pid] not in main_patients][:20]
    labels = tmp_path / "extra.csv"
    labels.write_text("\n".join([header, *shared, *other]) + "\n")
    spec = Recipe(image_size=64).spec()
    known = {r.image_index for r in data.records}
    extra = load_extra([Source(cxr14_dir / "lowres64", labels, 2.0)], known, spec)
    assert extra is not None and len(extra.targets) == len(extra.tensors) > 0
    assert set(extra.weights.tolist()) == {2.0}
    patients = np.asarray([r.patient_id for r in data.records])
    left_out = 0
    for k in range(5):
        held = set(patients[fold == k].tolist())
        use = extra.usable(held)
        assert not {extra.patients[i] for i in use} & held
        left_out += len(extra.patients) - len(use)
    assert left_out > 0  # the shared data has such patients
    assert extra.counts[0]["weight"] == 2.0 and extra.counts[0]["n_images"] == len(extra.targets)


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
    assert "M parameters" in text and "GFLOPs" in text
    # runs on other folds are refused (here: another fold seed)
    other = tmp_path / "other-folds"
    other.mkdir()
    for name in ("cv.json", "oof.csv"):
        (other / name).write_bytes((tiny_cv / name).read_bytes())
    (other / "folds.csv").write_text((tiny_cv / "folds.csv").read_text().replace(",0\n", ",9\n"))
    with pytest.raises(TrainingError, match="other folds"):
        cv_report([tiny_cv, other])
