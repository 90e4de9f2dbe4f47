"""Helpers shared by the worklist tests (study and SOP UIDs, results, a study run to done)."""

from __future__ import annotations

from triage_core.spec import Finding, ImageResult, StudyResult
from triage_core.worklist import Worklist

ROOT = "1.2.826.0.1.3680043.8.498"


def study(n: int) -> str:
    return f"{ROOT}.1.{n}"


def sop(n: int, k: int = 1) -> str:
    return f"{ROOT}.2.{n}.{k}"


def result_for(
    study_uid: str,
    score: float,
    level: str = "routine",
    status: str = "done",
    reason: str = "",
    source: str = "",
) -> StudyResult:
    findings: tuple[Finding, ...] = (
        Finding("Atelectasis", 0.1, 0.5, False, source),
        Finding("Effusion", score / 100.0, 0.5, score >= 50, source),
    )
    images = (
        ImageResult(source or sop(0), True, "", {"Atelectasis": 0.1, "Effusion": score / 100.0}),
    )
    if status == "not_eligible":
        findings = ()
        images = (ImageResult(source or sop(0), False, reason),)
    return StudyResult(
        study_uid=study_uid,
        status=status,
        reason=reason,
        findings=findings,
        priority_score=score,
        priority_level=level,
        images=images,
        model_name="random-test-model",
        model_version="0",
        timings={"preprocess": 0.01, "inference": 0.02},
    )


def run_to_done(wl: Worklist, n: int, score: float, level: str, t: float) -> None:
    wl.ingest.record_instance(study(n), sop(n), f"/spool/{n}.dcm", now=t)
    assert wl.queue.queue_stable_studies(5, now=t + 5) == [study(n)]
    claimed = wl.queue.claim_study("w", 60, now=t + 6)
    assert claimed is not None and claimed.study_uid == study(n)
    wl.queue.complete_study(
        study(n), "w", result_for(study(n), score, level, source=sop(n)), now=t + 7
    )
