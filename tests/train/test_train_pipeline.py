"""Short real training runs on a few NIH images (read in place), resume, predict, evaluate.

Models here are tiny (64 px, a few dozen images, 1-2 epochs): they test the plumbing, not the
clinical quality.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.train import (
    STATE_FILE,
    TrainConfig,
    TrainingError,
    load_training_state,
    train,
)
from triage_core.spec import CLASS_NAMES

IMAGES = 40


def _config(cxr14_dir: Path, out: Path, **changes: object) -> TrainConfig:
    base = dict(
        images=cxr14_dir / "256",
        labels=cxr14_dir / "labels.csv",
        out=out,
        arch="resnet18",
        task="multilabel",
        epochs=1,
        batch_size=8,
        image_size=64,
        max_images=IMAGES,
        seed=3,
        progress=False,
        threads=1,
        command="pytest",
    )
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def multilabel_run(cxr14_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("train_ml")
    result = train(_config(cxr14_dir, out))
    assert result.checkpoint is not None
    return result.checkpoint


def test_training_writes_a_loadable_calibrated_checkpoint(multilabel_run: Path) -> None:
    from triage_core.models import load_checkpoint

    model, spec = load_checkpoint(multilabel_run)
    assert spec.arch == "resnet18" and spec.task == "multilabel" and spec.input_size == 64
    assert spec.temperature > 0 and len(spec.thresholds) == 3
    assert all(0.0 <= t <= 1.0 for t in spec.thresholds)
    training = spec.training
    sizes = training["data"]["split"]["sizes"]
    assert sum(sizes.values()) == IMAGES and sizes["train"] > sizes["val"] > 0
    assert training["seed"] == 3 and training["epochs_run"] == 1
    assert training["command"] == "pytest"
    assert spec.code_version and spec.metrics["split"] == "val"
    assert "sensitivity >= 0.9" in spec.metrics["thresholds"]["rule"]
    assert (multilabel_run.parent / STATE_FILE).is_file()
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 3)


def test_triage_predict_uses_the_trained_checkpoint(
    multilabel_run: Path, cxr14_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import main

    image = sorted((cxr14_dir / "256").glob("*.png"))[0]
    code = main(["predict", str(image), "--model", str(multilabel_run), "--threads", "1"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    row = lines[0]
    assert row["eligible"] is True
    assert set(row["probabilities"]) == {"Atelectasis", "Effusion", "Infiltration"}
    assert row["model"]["name"] == "cxr-triage-resnet18-multilabel"

    # the same probabilities as the training code's own forward pass (through imaging.to_tensor)
    from training.calibrate import probabilities
    from training.data import load_tensors
    from training.train import predict_logits
    from triage_core.models import load_checkpoint

    model, spec = load_checkpoint(multilabel_run)
    probs = probabilities(
        predict_logits(model, load_tensors([image], spec)), spec.task, spec.temperature
    )[0]
    got = np.array([row["probabilities"][n] for n in spec.class_names])
    assert np.allclose(got, probs, atol=0.03)  # predict may run bf16 on CPU


def test_resume_continues_at_saved_epoch_with_saved_optimizer_state(
    cxr14_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    first = train(_config(cxr14_dir, tmp_path, epochs=1))
    state = load_training_state(tmp_path / STATE_FILE)
    assert state["epoch"] == 1
    saved_steps = int(next(iter(state["optimizer"]["state"].values()))["step"])
    assert saved_steps == first.optimizer_steps > 0
    saved_exp_avg = next(iter(state["optimizer"]["state"].values()))["exp_avg"].clone()

    resumed = train(_config(cxr14_dir, tmp_path, epochs=2, resume=tmp_path / STATE_FILE))
    assert resumed.start_epoch == 1
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    # the optimizer continued: one more epoch of steps on top of the saved count
    assert resumed.optimizer_steps == 2 * saved_steps
    after = load_training_state(tmp_path / STATE_FILE)
    assert after["epoch"] == 2
    assert not torch.equal(
        next(iter(after["optimizer"]["state"].values()))["exp_avg"], saved_exp_avg
    )
    assert resumed.spec is not None and resumed.spec.training["epochs_run"] == 2

    # a state from another configuration is refused with the field named
    with pytest.raises(TrainingError, match="seed"):
        train(
            _config(cxr14_dir, tmp_path / "other", epochs=2, seed=4, resume=tmp_path / STATE_FILE)
        )
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match="not a readable training state"):
        train(_config(cxr14_dir, tmp_path / "other", resume=tmp_path / "junk.pt"))


def _check_against_sklearn(out: Path, metrics: dict, class_names: tuple[str, ...]) -> None:  # type: ignore[type-arg]
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


def test_evaluate_metrics_equal_sklearn_multilabel(
    multilabel_run: Path, cxr14_dir: Path, tmp_path: Path
) -> None:
    from training.evaluate import evaluate_checkpoint
    from triage_core.models import read_spec

    spec = read_spec(multilabel_run)
    metrics = evaluate_checkpoint(
        multilabel_run,
        cxr14_dir / "256",
        cxr14_dir / "labels.csv",
        tmp_path,
        n_boot=200,
        cam_images=2,
    )
    assert metrics["split"] == "test"
    assert metrics["images"] == spec.training["data"]["split"]["sizes"]["test"]
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["macro_f1"] == metrics["macro_f1"]
    _check_against_sklearn(tmp_path, on_disk, spec.class_names)
    for plot in ("roc.png", "reliability.png", "cam_grid.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert "ece_before" in on_disk and "ece_after" in on_disk

    # with other labels (here: rows dropped) the recorded test split cannot be rebuilt
    from training.data import DatasetError

    rows = (cxr14_dir / "labels.csv").read_text().splitlines()
    (tmp_path / "fewer.csv").write_text("\n".join(rows[:1] + rows[1::2]) + "\n")
    with pytest.raises(DatasetError, match="do not reproduce"):
        evaluate_checkpoint(
            multilabel_run,
            cxr14_dir / "256",
            tmp_path / "fewer.csv",
            tmp_path / "x",
            cam_images=0,
        )
    # ...but "all" evaluates every image given (an external set)
    every = evaluate_checkpoint(
        multilabel_run,
        cxr14_dir / "256",
        tmp_path / "fewer.csv",
        tmp_path / "all",
        split="all",
        n_boot=50,
        cam_images=0,
    )
    assert every["images"] == len(rows[1::2])


def test_multiclass_train_and_evaluate_equal_sklearn(cxr14_dir: Path, tmp_path: Path) -> None:
    from training.evaluate import evaluate_checkpoint
    from triage_core.models import read_spec

    torch.set_num_threads(1)
    # every fourth row of the shared labels keeps the run short; the multiclass task keeps the
    # rows with exactly one of the three findings, counted here with the csv module
    rows = (cxr14_dir / "labels.csv").read_text().splitlines()
    subset = tmp_path / "subset.csv"
    subset.write_text("\n".join(rows[:1] + rows[1::4]) + "\n")
    with subset.open(newline="") as handle:
        single = sum(
            len(set(row["Finding Labels"].split("|")) & set(CLASS_NAMES)) == 1
            for row in csv.DictReader(handle)
        )
    result = train(
        _config(
            cxr14_dir,
            tmp_path / "mc",
            labels=subset,
            task="multiclass",
            arch="efficientnet_b0",
            max_images=None,
            epochs=1,
            image_size=64,
            batch_size=16,
        )
    )
    assert result.checkpoint is not None
    spec = read_spec(result.checkpoint)
    assert spec.task == "multiclass" and spec.training["data"]["task_images"] == single
    metrics = evaluate_checkpoint(
        result.checkpoint,
        cxr14_dir / "256",
        subset,
        tmp_path / "eval",
        n_boot=100,
        cam_images=0,
    )
    assert (tmp_path / "eval" / "confusion.png").is_file()
    _check_against_sklearn(tmp_path / "eval", metrics, spec.class_names)


def test_extra_training_images_never_include_heldout_patients(cxr14_dir: Path) -> None:
    from training.splits import extra_training_data, load_task_data, make_split

    config = _config(
        cxr14_dir,
        Path("unused"),
        max_images=None,
        seed=0,
        extra_images=cxr14_dir / "lowres64",
        extra_labels=cxr14_dir / "lowres64" / "labels.csv",
    )
    data, _ = load_task_data(config.images, config.labels, config.task)
    split = make_split(data, config)
    extra, paths, info = extra_training_data(config, data, split, input_size=64)
    held_out = {data.records[int(i)].patient_id for i in (*split.val, *split.test)}
    assert extra.records and not {r.patient_id for r in extra.records} & held_out
    assert len(paths) == len(extra) == info["used"]
    total = sum(1 for _ in (cxr14_dir / "lowres64" / "labels.csv").open()) - 1
    assert info["used"] + info["left_out_heldout_patients"] + info["left_out_duplicates"] == total
    assert info["left_out_heldout_patients"] > 0  # the shared data has such patients
    assert info["smaller_than_input"] == 0  # 64 px images at a 64 px input
    _, _, info_224 = extra_training_data(config, data, split, input_size=224)
    assert info_224["smaller_than_input"] == info["used"]  # reported, not silent


def test_same_seed_same_weights(cxr14_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    runs = []
    for name in ("a", "b", "c"):
        seed = 5 if name != "c" else 6
        result = train(_config(cxr14_dir, tmp_path / name, max_images=24, seed=seed))
        assert result.checkpoint is not None
        runs.append(load_file(str(result.checkpoint) + ".safetensors"))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # reproducible
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # seed matters


@pytest.mark.slow
def test_imagenet_initialisation_beats_random_on_validation(
    cxr14_dir: Path, tmp_path: Path
) -> None:
    """The same short seeded run (Lite0, 128 px, linear-probe head + 1 epoch, all 584 images)
    from the packaged ImageNet weights and from random weights: ImageNet must score higher on
    the validation split (the probe on random features has nothing to fit)."""
    torch.set_num_threads(2)
    scores = {}
    for init in ("imagenet", "none"):
        result = train(
            _config(
                cxr14_dir,
                tmp_path / init,
                arch="efficientnet_lite0",
                pretrained=init,
                head_init="probe",
                image_size=128,
                epochs=1,
                batch_size=16,
                max_images=None,
                lr=1e-4,
                seed=0,
                threads=2,
            )
        )
        assert result.spec is not None
        scores[init] = result.spec.metrics["score"]
        assert result.spec.mean == (0.5, 0.5, 0.5)
    assert scores["imagenet"] > scores["none"] + 0.02, scores


def test_probe_head_starts_from_a_fitted_classifier_and_epoch_0_is_a_candidate(
    cxr14_dir: Path, tmp_path: Path
) -> None:
    from sklearn.metrics import roc_auc_score

    from training.data import load_tensors
    from training.loop import predict_logits, probe_head
    from training.splits import load_task_data
    from triage_core.models import create_model, default_spec

    torch.set_num_threads(1)
    data, index = load_task_data(cxr14_dir / "256", cxr14_dir / "labels.csv", "multilabel", 40)
    spec = default_spec("efficientnet_lite0", "multilabel", "imagenet").replace(input_size=64)
    x = load_tensors([index[r.image_index] for r in data.records], spec)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, "imagenet")
    info = probe_head(model, x, data.targets, "multilabel")
    logits = predict_logits(model, x)
    # the head now is the probe: it ranks its own training images (almost) perfectly
    for k in range(3):
        assert roc_auc_score(data.targets[:, k], logits[:, k]) > 0.9
    assert info["train_mean_auroc"] > 0.9

    result = train(
        _config(
            cxr14_dir, tmp_path, arch="efficientnet_lite0", pretrained="imagenet", head_init="probe"
        )
    )
    assert result.history[0]["epoch"] == 0 and "val_score" in result.history[0]
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert result.spec is not None and result.spec.training["head_init"] == "probe"
