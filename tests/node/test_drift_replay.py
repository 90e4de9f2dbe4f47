"""The drift alarm on real scores: shared chest images scored by the shipped model through
``triage predict`` and recorded in a worklist do not alarm against the spec's out-of-fold
reference; the same images with inverted contrast (a mis-set MONOCHROME1/2 flag, the classic
upstream fault) do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from test_api_http import ROOT, sop, study

from dicom_node.web import operations
from triage_core.models import default_checkpoint_path, read_spec
from triage_core.spec import Finding, StudyResult
from triage_core.worklist import Worklist

#: Studies replayed per case (the alarm needs at least operations.MIN_STUDIES).
STUDIES = 60


def _score(files: list[Path], capsys: pytest.CaptureFixture[str]) -> list[dict[str, float]]:
    from dicom_node.cli import main

    capsys.readouterr()
    assert main(["predict", *map(str, files), "--format", "json", "--threads", "2"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(rows) == len(files)
    return [row["probabilities"] for row in rows]


def _replay(tmp_path: Path, label: str, scores: list[dict[str, float]]) -> dict[str, object]:
    spec = read_spec(default_checkpoint_path())
    wl = Worklist(Worklist.sqlite_url(tmp_path / label))
    wl.create_all()
    try:
        for n, probs in enumerate(scores, start=1):
            wl.ingest.record_instance(
                study(n), sop(n), f"/spool/{n}.dcm", series_uid=f"{ROOT}.3.{n}"
            )
            wl.queue.queue_stable_studies(0)
            claimed = wl.queue.claim_study("w", 60)
            assert claimed is not None
            findings = tuple(
                Finding(name, probs[name], t, probs[name] >= t, sop(n))
                for name, t in zip(spec.class_names, spec.thresholds, strict=True)
            )
            wl.queue.complete_study(
                study(n),
                "w",
                StudyResult(
                    study_uid=study(n),
                    status="done",
                    findings=findings,
                    priority_score=0.0,
                    priority_level="routine",
                    model_name=spec.name,
                    model_version=spec.version,
                ),
            )
        return operations.summary(wl, operations.drift_reference(None))["findings"]
    finally:
        wl.dispose()


def test_replayed_chest_images_do_not_alarm_and_inverted_ones_do(
    cxr14_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = sorted(p.name for p in (cxr14_dir / "256").glob("*.png"))
    step = len(names) // STUDIES
    files = [cxr14_dir / "256" / n for n in names[::step][:STUDIES]]
    inverted = []
    for f in files:
        out = tmp_path / f"inv_{f.name}"
        ImageOps.invert(Image.open(f).convert("L")).save(out)
        inverted.append(out)
    plain = _replay(tmp_path, "plain", _score(files, capsys))
    flipped = _replay(tmp_path, "inverted", _score(inverted, capsys))
    for name, f in plain.items():
        assert f["n"] == STUDIES >= operations.MIN_STUDIES
        assert f["distance"] is not None and f["critical"] is not None
        assert f["alarm"] is False, (name, f["distance"], f["critical"])
    assert any(f["alarm"] for f in flipped.values()), {
        name: (f["distance"], f["critical"]) for name, f in flipped.items()
    }
