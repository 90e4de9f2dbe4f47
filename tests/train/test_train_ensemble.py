"""Ensembles chosen by cross-validation (issue 23, item 3): the OOF prediction of an ensemble is
the mean of its members' OOF probabilities on the same folds, scored with the patient bootstrap,
tabulated by `triage compare` beside the single models with the ship rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.ensemble import EnsembleSpec, ensemble_oof, score_ensemble, ship_decision
from training.oof import patient_bootstrap
from training.recipe import TrainingError


def _run(name: str, logits: np.ndarray, y: np.ndarray, task: str = "multilabel") -> dict[str, Any]:
    n = len(y)
    return {
        "dir": name,
        "summary": {"task": task, "class_names": ["A", "B", "C"], "recipe": {"arch": "x"}},
        "images": [f"i{i}.png" for i in range(n)],
        "patients": [f"p{i // 2}" for i in range(n)],
        "labels": y,
        "logits": {"final": logits, "ema": logits + 0.0},
    }


def _members(seed: int = 0) -> tuple[np.ndarray, list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    y = (rng.random((400, 3)) < 0.3).astype(float)
    runs = [_run(f"m{j}", 1.5 * y + rng.normal(0, 1.2, y.shape), y) for j in range(3)]
    return y, runs


def test_ensemble_is_the_mean_of_member_probabilities() -> None:
    y, runs = _members()
    mean, used = ensemble_oof([(runs[0], None), (runs[1], "final")])
    assert used == ["ema", "final"]
    sig = [1 / (1 + np.exp(-r["logits"]["final"])) for r in runs[:2]]
    assert np.allclose(mean, (sig[0] + sig[1]) / 2, atol=1e-6)
    mean_logit = (runs[0]["logits"]["final"] + runs[1]["logits"]["final"]) / 2
    assert not np.allclose(mean, 1 / (1 + np.exp(-mean_logit)), atol=1e-3)  # probabilities
    row = score_ensemble([(r, None) for r in runs])
    all_three = ensemble_oof([(r, None) for r in runs])[0]
    assert row["mean"] == patient_bootstrap(y, all_three, runs[0]["patients"])["mean"]
    singles = {r["dir"]: patient_bootstrap(y, r["logits"]["ema"], r["patients"]) for r in runs}
    best = max(v["mean"][0] for v in singles.values())
    assert row["mean"][0] > best + 0.01  # independent errors average out
    decision = ship_decision(singles, row)
    assert decision["ship"] and decision["gain"] == pytest.approx(row["mean"][0] - best, abs=1e-4)
    # the same model twice gains nothing: not shipped
    twice = score_ensemble([(runs[0], "final"), (runs[0], "ema")])
    assert not ship_decision(singles, twice)["ship"]
    assert [m["variant"] for m in twice["members"]] == ["final", "ema"]


def test_ensembles_of_unlike_runs_are_refused() -> None:
    y, runs = _members()
    other = _run("other", runs[1]["logits"]["final"], y)
    other["images"] = other["images"][::-1]
    with pytest.raises(TrainingError, match="other images"):
        ensemble_oof([(runs[0], None), (other, None)])
    multiclass = _run("mc", runs[1]["logits"]["final"], y, task="multiclass")
    with pytest.raises(TrainingError, match="another task"):
        ensemble_oof([(runs[0], None), (multiclass, None)])
    with pytest.raises(TrainingError, match="no complete variant 'epoch3'"):
        ensemble_oof([(runs[0], None), (runs[1], "epoch3")])
    with pytest.raises(TrainingError, match="two members or more"):
        EnsembleSpec.parse("a")
    spec = EnsembleSpec.parse("seeds=runs/a:final,runs/b")
    assert spec.name == "seeds" and spec.members == (
        (Path("runs/a"), "final"),
        (Path("runs/b"), None),
    )
    assert EnsembleSpec.parse("x/a,y/b").name == "a+b"


def test_compare_tabulates_an_ensemble_of_cv_runs_with_the_ship_rule(
    cxr14_dir: Path, tmp_path: Path, one_torch_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import main

    data = ["--images", str(cxr14_dir / "256"), "--labels", str(cxr14_dir / "labels.csv")]
    runs = []
    for seed in (1, 2):  # a seed ensemble: two runs on the same folds
        out = tmp_path / f"seed{seed}"
        argv = [
            "train", "--cv", "2", *data, "--max-images", "40", "--image-size", "32",
            "--epochs", "1", "--ema", "0", "--pretrained", "none", "--seed", str(seed),
            "--threads", "1", "--no-progress", "--out", str(out),
        ]  # fmt: skip
        assert main(argv) == 0
        runs.append(out)
    report = tmp_path / "report"
    ensemble = f"seeds={runs[0]},{runs[1]}"
    compare = ["compare", "--cv-runs", *map(str, runs), "--ensemble", ensemble]
    assert main([*compare, "--out", str(report)]) == 0
    text = (report / "cv_report.md").read_text()
    capsys.readouterr()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "ensemble seeds" in rows  # beside the single models, in the same table
    singles = [json.loads((r / "cv.json").read_text())["variants"]["final"] for r in runs]
    from training.runs import load_runs

    loaded = load_runs(runs)
    row = score_ensemble([(r, None) for r in loaded])
    assert (
        f"{row['mean'][0]:.3f} [{row['mean'][1]:.3f}, {row['mean'][2]:.3f}]"
        in rows["ensemble seeds"]
    )
    best = max(s["mean"][0] for s in singles)
    gain = row["mean"][0] - best
    verdict = "SHIP" if gain >= 0.01 else "do not ship"
    assert f"gain {gain:+.3f}" in text and f"-> {verdict}." in text
    assert "ship only if the gain is >= 0.01" in text
    # a member on other folds is refused
    other = tmp_path / "other-folds"
    other.mkdir()
    for name in ("cv.json", "oof.csv"):
        (other / name).write_bytes((runs[1] / name).read_bytes())
    (other / "folds.csv").write_text((runs[1] / "folds.csv").read_text().replace(",0\n", ",9\n"))
    code = main(
        ["compare", "--cv-runs", str(runs[0]), "--ensemble", f"{runs[0]},{other}"]
        + ["--out", str(report)]
    )
    assert code == 2 and "other folds" in capsys.readouterr().err
