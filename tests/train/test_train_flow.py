"""The seed study's protocol inside the one flow: ``triage train --cv K --task multiclass``
(weighted cross-entropy) and ``--final-from`` through the console script, evaluated against
scikit-learn; the linear-probe head; ImageNet against random initialisation (slow).

Models here are tiny (64 px, a few dozen images, 1 epoch, 1 thread): plumbing, not quality.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.recipe import Recipe
from triage_core.spec import CLASS_NAMES


def _subset(cxr14_dir: Path, out: Path, step: int) -> tuple[Path, int]:
    """Every ``step``-th row of the shared labels, and how many of them the multiclass task
    keeps (exactly one of the three findings), counted here with the csv module."""
    rows = (cxr14_dir / "labels.csv").read_text().splitlines()
    out.write_text("\n".join(rows[:1] + rows[1::step]) + "\n")
    with out.open(newline="") as handle:
        single = sum(
            len(set(row["Finding Labels"].split("|")) & set(CLASS_NAMES)) == 1
            for row in csv.DictReader(handle)
        )
    return out, single


def test_cv_multiclass_uses_weighted_cross_entropy_and_final_equals_sklearn(
    cxr14_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
    sklearn_check: Any,
) -> None:
    import training.fit
    from dicom_node.cli import main
    from training.evaluate import evaluate_checkpoint
    from training.runs import read_oof
    from triage_core.models import read_spec

    labels, single = _subset(cxr14_dir, tmp_path / "subset.csv", 12)
    losses: list[tuple[torch.nn.Module, np.ndarray]] = []
    real = training.fit.loss_function

    def recording(task: str, targets: np.ndarray, *args: Any) -> torch.nn.Module:
        loss = real(task, targets, *args)
        losses.append((loss, np.asarray(targets)))
        return loss

    monkeypatch.setattr(training.fit, "loss_function", recording)
    cv = tmp_path / "cv"
    data = ["--images", str(cxr14_dir / "256"), "--labels", str(labels)]
    code = main(
        [
            "train", "--cv", "2", "--task", "multiclass", "--arch", "resnet18", *data,
            "--out", str(cv), "--image-size", "64", "--epochs", "1", "--batch-size", "16",
            "--threads", "1", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    # each fold trained with class-weighted cross-entropy, N / (C * n_c) of its own targets
    assert len(losses) == 2
    for loss, targets in losses:
        assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.weight is not None
        counts = np.bincount(targets, minlength=3)
        assert np.allclose(loss.weight.numpy(), len(targets) / (3 * counts))
    # the OOF file has the multiclass columns: one-hot labels, a logit per class and variant
    header = (cv / "oof.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["Image Index", "Patient ID", "fold", *CLASS_NAMES]
    assert {f"final:{c}" for c in CLASS_NAMES} | {f"ema:{c}" for c in CLASS_NAMES} <= set(header)
    images, _, y, logits = read_oof(cv / "oof.csv")
    assert len(images) == single and np.array_equal(y.sum(axis=1), np.ones(single))
    summary = json.loads((cv / "cv.json").read_text())
    assert summary["task"] == summary["recipe"]["task"] == "multiclass"
    accuracy = float((logits["final"].argmax(1) == y.argmax(1)).mean())
    assert summary["variants"]["final"]["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert 0 <= summary["variants"]["ema"]["macro_f1"] <= 1

    # recipe flags with --final-from would be ignored: refused
    assert main(["train", "--final-from", str(cv), "--out", str(tmp_path), "--epochs", "3"]) == 2
    final = tmp_path / "final"
    code = main(
        ["train", "--final-from", str(cv), *data, "--out", str(final), "--threads", "1",
         "--no-progress", "--name", "mc"]
    )  # fmt: skip
    assert code == 0
    spec = read_spec(final / "mc")
    assert spec.task == "multiclass" and spec.arch == "resnet18"
    assert spec.training["data"]["n_images"] == single and spec.temperature > 0
    assert spec.metrics["oof"]["logit_shift"] == [0.0, 0.0, 0.0]  # softmax: temperature only
    metrics = evaluate_checkpoint(
        final / "mc", cxr14_dir / "256", labels, tmp_path / "eval", n_boot=100, cam_images=0
    )
    assert metrics["images"] == single and (tmp_path / "eval" / "confusion.png").is_file()
    sklearn_check(tmp_path / "eval", metrics, spec.class_names)


def test_operator_errors_of_train_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import main

    assert main(["train", "--out", str(tmp_path)]) == 2
    assert "exactly one of --cv K and --final-from" in capsys.readouterr().err
    assert main(["train", "--final-from", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "has no cv.json" in capsys.readouterr().err
    assert main(["train", "--cv", "2", "--out", str(tmp_path)]) == 2
    assert "--cv needs --images and --labels" in capsys.readouterr().err
    for bad in (["--crop", "big"], ["--source", "a,b,-1"], ["--cv", "0"]):
        with pytest.raises(SystemExit):  # argparse type= checks: usage + exit status 2
            main(["train", "--cv", "2", "--out", str(tmp_path), *bad])
        assert "argument" in capsys.readouterr().err


def test_probe_head_starts_from_a_fitted_classifier_and_epoch_0_is_a_candidate(
    cxr14_dir: Path, one_torch_thread: None
) -> None:
    from sklearn.metrics import roc_auc_score

    from training.data import load_tensors
    from training.fit import fit
    from training.predict import predict_logits, probe_head
    from training.splits import load_task_data
    from triage_core.models import create_model

    data, index = load_task_data(cxr14_dir / "256", cxr14_dir / "labels.csv", "multilabel", 40)
    recipe = Recipe(image_size=64, epochs=1, batch_size=8, head_init="probe", ema=0.0)
    spec = recipe.spec()
    x = load_tensors([index[r.image_index] for r in data.records], spec)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, "imagenet")
    info = probe_head(model, x, data.targets, "multilabel")
    logits = predict_logits(model, x)
    # the head now is the probe: it ranks its own training images (almost) perfectly
    for k in range(3):
        assert roc_auc_score(data.targets[:, k], logits[:, k]) > 0.9
    assert info["train_mean_auroc"] > 0.9
    seen: list[int] = []
    result = fit(recipe, x, data.targets, spec, on_epoch=lambda e, _m: seen.append(e))
    assert seen == [0, 1] and [h["epoch"] for h in result.history] == [1]


@pytest.mark.slow
def test_imagenet_initialisation_beats_random_out_of_fold(cxr14_dir: Path, tmp_path: Path) -> None:
    """The same short seeded 2-fold CV (Lite0, 128 px, linear-probe head + 1 epoch, every
    image) from the packaged ImageNet weights and from random weights: ImageNet must score a
    higher OOF mean AUROC (the probe on random features has nothing to fit)."""
    from training.cv import CVConfig, run_cv

    torch.set_num_threads(2)
    scores = {}
    for init in ("imagenet", "none"):
        recipe = Recipe(
            image_size=128, epochs=1, head_init="probe", lr=1e-4, pretrained=init, ema=0.0
        )
        summary = run_cv(
            CVConfig(
                images=cxr14_dir / "256",
                labels=cxr14_dir / "labels.csv",
                out=tmp_path / init,
                recipe=recipe,
                folds=2,
                progress=False,
                threads=2,
            )
        )
        scores[init] = summary["variants"]["final"]["mean"][0]
        assert recipe.spec().mean == (0.5, 0.5, 0.5)
    assert scores["imagenet"] > scores["none"] + 0.02, scores


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "efficientnet_lite0"])
def test_every_architecture_fits_the_multiclass_task(
    arch: str, cxr14_dir: Path, one_torch_thread: None
) -> None:
    from training.data import load_tensors
    from training.fit import fit
    from training.splits import load_task_data

    data, index = load_task_data(cxr14_dir / "256", cxr14_dir / "labels.csv", "multiclass", 24)
    recipe = Recipe(arch=arch, task="multiclass", image_size=32, epochs=1, batch_size=8, ema=0)
    spec = recipe.spec()
    assert spec.task == "multiclass" and spec.num_classes == 3
    x = load_tensors([index[r.image_index] for r in data.records], spec)
    result = fit(recipe, x, data.targets, spec)
    assert [h["epoch"] for h in result.history] == [1] and result.optimizer_steps == 3
    with torch.inference_mode():
        assert result.model.eval()(x[:2].float()).shape == (2, 3)
