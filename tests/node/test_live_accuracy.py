"""Live accuracy from readers' verdicts: the figures equal a hand count of a known set of verdicts,
the intervals equal independent computations, and the page and /metrics show them beside the
model card (real SQLite worklist, TestClient)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from dicom_node import web
from dicom_node.metrics import Metrics
from dicom_node.settings import NodeSettings
from dicom_node.web.accuracy import (
    Card,
    auroc_delong,
    card_figures,
    live_accuracy,
    load_card,
    wilson,
)
from dicom_node.web.api import create_app
from triage_core.spec import Finding, ImageResult, StudyResult
from triage_core.worklist import Worklist

ROOT = "1.2.826.0.1.3680043.8.498.77"
MODEL, VERSION = "cxr-test-model", "7"
T0 = 1_700_000_000.0

#: (Effusion probability, truth) for 24 studies at threshold 0.5, by hand:
#: flagged (p >= 0.5) and present: 8 (TP); flagged, absent: 3 (FP);
#: below, present: 4 (FN); below, absent: 9 (TN).
CASES: list[tuple[float, bool]] = (
    [(p, True) for p in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.55)]  # TP
    + [(p, False) for p in (0.65, 0.52, 0.5)]  # FP (0.5 is at the threshold: flagged)
    + [(p, True) for p in (0.45, 0.3, 0.2, 0.2)]  # FN
    + [(p, False) for p in (0.45, 0.4, 0.35, 0.3, 0.2, 0.2, 0.15, 0.1, 0.05)]  # TN
)
TP, FP, FN, TN = 8, 3, 4, 9


def scored(wl: Worklist, n: int, probability: float, t: float) -> str:
    uid = f"{ROOT}.1.{n}"
    sop = f"{ROOT}.2.{n}"
    wl.ingest.record_instance(uid, sop, f"/spool/{n}.dcm", series_uid=f"{ROOT}.3.{n}", now=t)
    wl.queue.queue_stable_studies(0, now=t + 1)
    assert wl.queue.claim_study("w", 60, now=t + 1) is not None
    result = StudyResult(
        study_uid=uid,
        status="done",
        findings=(Finding("Effusion", probability, 0.5, probability >= 0.5, sop),),
        priority_score=100 * probability,
        priority_level="routine",
        images=(ImageResult(sop, True, "", {"Effusion": probability}),),
        model_name=MODEL,
        model_version=VERSION,
    )
    wl.queue.complete_study(uid, "w", result, now=t + 2)
    return uid


@pytest.fixture()
def wl(tmp_path: Path) -> Iterator[Worklist]:
    w = Worklist(Worklist.sqlite_url(tmp_path))
    w.create_all()
    for n, (p, truth) in enumerate(CASES):
        uid = scored(w, n, p, T0 + 10 * n)
        verdict = "present" if truth else "absent"
        if n % 5 == 0:  # a changed mind: the latest counts
            w.feedback.add(uid, "Effusion", "absent" if truth else "present", "dr.a", now=T0 + n)
        w.feedback.add(uid, "Effusion", verdict, "dr.a", now=T0 + 100 + n)
        if n % 3 == 0:  # a second reader agrees, or is unsure: still decided
            w.feedback.add(uid, "Effusion", verdict if n % 2 else "unsure", "dr.b", now=T0 + 200)
    # left out: a disputed study, an unsure-only study, a study with no verdict
    disputed = scored(w, 100, 0.9, T0 + 2000)
    w.feedback.add(disputed, "Effusion", "present", "dr.a")
    w.feedback.add(disputed, "Effusion", "absent", "dr.b")
    w.feedback.add(scored(w, 101, 0.9, T0 + 2010), "Effusion", "unsure", "dr.a")
    scored(w, 102, 0.9, T0 + 2020)
    yield w
    w.dispose()


def write_spec(path: Path, metrics: dict[str, object]) -> Path:
    spec = {"name": MODEL, "version": VERSION, "class_names": ["Effusion"], "metrics": metrics}
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path.with_suffix("")


#: A card far better than the live figures (the warning must fire) on sensitivity only.
CARD = {
    "operating_points": {
        "Effusion": {
            "sensitivity": [0.98, 0.95, 0.99],
            "specificity": [0.6, 0.4, 0.8],
            "ppv": [0.7, 0.5, 0.85],
        }
    },
    "oof": {"auroc": {"Effusion": [0.8, 0.7, 0.9]}},
}


def test_wilson_and_delong_match_independent_computations() -> None:
    for k, n in ((8, 12), (0, 5), (5, 5), (1, 37)):
        p, lo, hi = wilson(k, n)  # type: ignore[misc]
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert p == k / n and lo == pytest.approx(ci.low, abs=1e-9)
        assert hi == pytest.approx(ci.high, abs=1e-9)
    assert wilson(0, 0) is None
    pos = [p for p, t in CASES if t]
    neg = [p for p, t in CASES if not t]
    auc, lo, hi = auroc_delong(pos, neg)  # type: ignore[misc]
    # hand count: pairs (positive above negative) + half the ties, over 12 x 12 pairs
    pairs = sum((x > y) + 0.5 * (x == y) for x in pos for y in neg)
    assert auc == pytest.approx(pairs / (len(pos) * len(neg)))
    assert auc == pytest.approx(roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg))
    # DeLong's variance from its definition (placement values over all pairs)
    psi = np.array([[(x > y) + 0.5 * (x == y) for y in neg] for x in pos], dtype=float)
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    assert lo == pytest.approx(max(0.0, auc - 1.959964 * se), abs=1e-5)
    assert hi == pytest.approx(min(1.0, auc + 1.959964 * se), abs=1e-5)


def test_live_figures_equal_the_hand_count(wl: Worklist) -> None:
    card = Card(MODEL, VERSION, "out-of-fold", card_figures(CARD, ["Effusion"])[1])
    rows = live_accuracy(wl.feedback.labelled(), card)
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["version"], row["finding"]) == (MODEL, VERSION, "Effusion")
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (TP, FP, FN, TN)
    assert row["studies"] == 24 and (row["positives"], row["negatives"]) == (12, 12)
    assert row["counts"]["sensitivity"] == (8, 12) and row["live"]["sensitivity"][0] == 8 / 12
    assert row["counts"]["specificity"] == (9, 12) and row["live"]["specificity"][0] == 9 / 12
    assert row["counts"]["ppv"] == (8, 11) and row["live"]["ppv"][0] == 8 / 11
    assert row["live"]["sensitivity"][1:] == pytest.approx(wilson(8, 12)[1:])  # type: ignore[index]
    assert "auroc" in row["live"]  # 12 and 12 >= 10 each
    # card sensitivity [0.95, 0.99]; live Wilson upper for 8/12 is 0.86: wholly below
    assert row["below"] == ["sensitivity"]
    # another version of the model: no card to compare with
    other = live_accuracy(wl.feedback.labelled(), Card(MODEL, "8", "x", card.figures))[0]
    assert other["card"] == {} and other["below"] == []


def test_auroc_waits_for_ten_per_class(wl: Worklist) -> None:
    few = [r for r in wl.feedback.labelled() if r.truth][:9] + [
        r for r in wl.feedback.labelled() if not r.truth
    ]
    row = live_accuracy(few, Card())[0]
    assert "auroc" not in row["live"] and row["counts"]["auroc"] == (9, 12)
    assert row["card"] == {}


def test_card_from_the_test_split_gets_wilson_intervals_of_its_counts(tmp_path: Path) -> None:
    legacy = {
        "test": {
            "images": 116,
            "per_class": {
                "Effusion": {
                    "recall": 10 / 13,
                    "specificity": 31 / 103,
                    "precision": 10 / 82,
                    "support": 13,
                    "auroc": 0.577,
                    "auroc_ci95": [0.417, 0.744],
                }
            },
        }
    }
    card = load_card(write_spec(tmp_path / "m.json", legacy))
    assert (card.name, card.version, card.source) == (MODEL, VERSION, "test split")
    fig = card.figures["Effusion"]
    assert fig["sensitivity"][1:] == pytest.approx(wilson(10, 13)[1:])  # type: ignore[index]
    assert fig["specificity"][1:] == pytest.approx(wilson(31, 103)[1:])  # type: ignore[index]
    assert fig["ppv"][1:] == pytest.approx(wilson(10, 82)[1:])  # type: ignore[index]
    assert fig["auroc"] == (0.577, 0.417, 0.744)
    assert load_card(tmp_path / "missing") == Card()  # unreadable: "n/a", no crash


def test_operations_page_and_metrics_show_live_accuracy(wl: Worklist, tmp_path: Path) -> None:
    model = write_spec(tmp_path / "card.json", CARD)
    s = NodeSettings(storage=tmp_path, model=model)
    metrics = Metrics(wl)
    app = create_app(wl, metrics)
    web.install(app, s, wl, metrics=metrics)
    c = TestClient(app)
    page = c.get("/operations")
    assert page.status_code == 200
    row = page.text.split('class="acc-row')[1].split("</tr>")[0]
    assert "alarm" in row.split(">")[0] and "below card" in row
    assert "0.67" in row and "(8/12)" in row and "(9/12)" in row and "(8/11)" in row
    assert "card 0.98" in row
    families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    live = {
        (s.labels["metric"], s.labels["bound"]): s.value
        for s in families["triage_live_accuracy"].samples
        if s.labels["finding"] == "Effusion" and s.labels["version"] == VERSION
    }
    assert live[("sensitivity", "estimate")] == pytest.approx(8 / 12)
    assert live[("ppv", "estimate")] == pytest.approx(8 / 11)
    below = {
        s.labels["metric"]: s.value for s in families["triage_live_accuracy_below_card"].samples
    }
    assert below == {"sensitivity": 1.0, "specificity": 0.0, "ppv": 0.0, "auroc": 0.0}
    counts = {s.labels["metric"]: s.value for s in families["triage_live_accuracy_count"].samples}
    assert counts["sensitivity"] == 12 and counts["ppv"] == 11
