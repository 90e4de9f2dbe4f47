"""Out-of-distribution score: reference fitting, spec storage, pipeline and SR reporting.

The plumbing tests use the tiny random ResNet-18 (not a real model). The last test needs the
shipped default checkpoint with an OOD reference (the EfficientNet-Lite0 default of issue 8):
it flags the shared hip film and a photograph and passes the shared chest films.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from triage_core import ood
from triage_core.errors import SpecMismatchError
from triage_core.imaging import load_image, to_tensor
from triage_core.inference import Predictor
from triage_core.pipeline import triage_study
from triage_core.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHEST_DICOMS = (
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "siim_cr_chest_rle_derived.dcm",
    "RG1_UNCR.dcm",
    "RG1_J2KR.dcm",
    "RG1_J2KI.dcm",
)
HIP_DICOMS = ("RG2_JPLL.dcm", "RG2_JLSL.dcm", "RG2_JPLY_fixed.dcm")


def _grace_hopper() -> Path:
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> Predictor:
    return Predictor(tiny_checkpoint, batch_size=8, mode="eager")


@pytest.fixture(scope="module")
def chest_tensors(cxr14_dir: Path, tiny: Predictor) -> torch.Tensor:
    pngs = sorted((cxr14_dir / "256").glob("*.png"))[:48]
    return torch.stack([to_tensor(load_image(p), tiny.spec) for p in pngs])


@pytest.fixture(scope="module")
def reference(tiny: Predictor, chest_tensors: torch.Tensor) -> dict[str, object]:
    return ood.fit_reference(
        tiny.model, tiny.spec, chest_tensors[:32], chest_tensors[32:], components=8, quantile=0.9
    )


def test_reference_round_trips_through_the_spec_json(
    tiny: Predictor, chest_tensors: torch.Tensor, reference: dict[str, object]
) -> None:
    spec = tiny.spec.replace(ood=reference)
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.ood == spec.ood
    assert reference["components"] == 8 and reference["features"] == 512  # ResNet-18 layer4
    # the threshold is the held-out images' 0.9 quantile: about 10 % of them lie above it
    predictor = Predictor(model=tiny.model, spec=again, mode="eager")
    held_out = predictor.ood_scores(chest_tensors[32:])
    assert held_out is not None and held_out.shape == (16,)
    limit = float(again.ood["threshold"])
    assert limit == pytest.approx(float(np.quantile(held_out, 0.9)), rel=1e-6)
    assert 1 <= int((held_out > limit).sum()) <= 2
    # held-out images score about 1 by construction (each distance over its held-out median)
    assert 1.0 <= float(np.median(held_out)) < 1.5


def test_noise_scores_far_above_chest_films(
    tiny: Predictor, chest_tensors: torch.Tensor, reference: dict[str, object]
) -> None:
    predictor = Predictor(model=tiny.model, spec=tiny.spec.replace(ood=reference), mode="eager")
    rng = np.random.default_rng(0)
    noise = torch.stack(
        [to_tensor(rng.random((64, 64)).astype(np.float32), tiny.spec) for _ in range(4)]
    )
    scores = predictor.ood_scores(noise)
    assert scores is not None
    assert float(scores.min()) > float(reference["threshold"])  # type: ignore[arg-type]


def test_without_reference_there_is_no_score(tiny: Predictor, chest_tensors: torch.Tensor) -> None:
    assert tiny.ood_scores(chest_tensors[:2]) is None
    assert ood.scores_from_features(tiny.spec, np.zeros((2, 512, 2, 2))) is None
    assert ood.threshold(tiny.spec) is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mean": "not base64!"}, "ood.mean"),
        ({"basis": "AAAA"}, "ood.basis"),
        ({"threshold": -1.0}, "ood.threshold"),
        ({"variances": [1.0]}, "ood.variances"),
        ({"method": "knn"}, "ood.method"),
        ({"extra": 1}, "ood.extra"),
    ],
)
def test_spec_refuses_a_broken_reference(
    tiny: Predictor, reference: dict[str, object], change: dict[str, object], field: str
) -> None:
    with pytest.raises(SpecMismatchError) as info:
        tiny.spec.replace(ood={**reference, **change})
    assert info.value.field == field


def test_spec_refuses_missing_reference_keys(tiny: Predictor, reference: dict[str, object]) -> None:
    broken = dict(reference)
    del broken["residual_scale"]
    with pytest.raises(SpecMismatchError, match="residual_scale"):
        tiny.spec.replace(ood=broken)


def test_fit_reference_checks_its_arguments(tiny: Predictor, chest_tensors: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="quantile"):
        ood.fit_reference(tiny.model, tiny.spec, chest_tensors, quantile=1.0)
    with pytest.raises(ValueError, match="components"):
        ood.fit_reference(tiny.model, tiny.spec, chest_tensors[:4], components=4)
    with pytest.raises(ValueError, match="at least 3"):
        ood.fit_reference(tiny.model, tiny.spec, chest_tensors[:2], components=1)


def test_pipeline_reports_low_confidence(
    dicom_dir: Path, tiny: Predictor, reference: dict[str, object]
) -> None:
    instances = [("1.2.3.1", dicom_dir / "RG1_J2KI.dcm"), ("1.2.3.2", dicom_dir / CHEST_DICOMS[0])]
    # a threshold below every score: every image is flagged, and so is the study
    strict = Predictor(
        model=tiny.model, spec=tiny.spec.replace(ood={**reference, "threshold": 1e-6}), mode="eager"
    )
    result = triage_study("1.2.3", instances, strict, with_cam=False).result
    assert all(im.low_confidence and im.ood_score is not None for im in result.images)
    assert result.low_confidence
    assert result.ood_score == max(im.ood_score or 0.0 for im in result.images)
    # a threshold above every score: nothing is flagged, the scores are the same
    lax = Predictor(
        model=tiny.model, spec=tiny.spec.replace(ood={**reference, "threshold": 1e6}), mode="eager"
    )
    again = triage_study("1.2.3", instances, lax, with_cam=False).result
    assert not again.low_confidence and not any(im.low_confidence for im in again.images)
    assert [im.ood_score for im in again.images] == pytest.approx(
        [im.ood_score for im in result.images]
    )
    # without a reference: no score at all
    plain = triage_study("1.2.3", instances, tiny, with_cam=False).result
    assert plain.ood_score is None and not plain.low_confidence


def test_shipped_default_flags_non_chest_images(dicom_dir: Path) -> None:
    """Issue 8: the OOD score of the shipped default flags the shared hip film and a photograph
    and passes the shared chest films."""
    from triage_core.models import default_checkpoint_path, read_spec

    spec = read_spec(default_checkpoint_path())
    if not spec.ood:
        pytest.skip(f"the shipped default {spec.display_name} has no OOD reference yet")
    predictor = Predictor(batch_size=4, mode="eager")
    names = [dicom_dir / n for n in CHEST_DICOMS + HIP_DICOMS] + [_grace_hopper()]
    batch = torch.stack([to_tensor(load_image(p), predictor.spec) for p in names])
    scores = predictor.ood_scores(batch)
    assert scores is not None
    limit = float(spec.ood["threshold"])
    chest = scores[: len(CHEST_DICOMS)]
    other = scores[len(CHEST_DICOMS) :]
    assert (chest <= limit).all(), dict(zip(CHEST_DICOMS, chest.round(2), strict=True))
    assert (other > limit).all(), other.round(2)


def test_worklist_rows_carry_low_confidence(tmp_path: Path) -> None:
    """The worklist (rows, study detail) keeps the study's OOD outcome (schema revision 0003)."""
    from triage_core.spec import Finding, ImageResult, StudyResult
    from triage_core.worklist import Worklist

    wl = Worklist(Worklist.sqlite_url(tmp_path / "storage"))
    wl.create_all()
    try:
        for n, (score, flagged) in enumerate(((7.5, True), (0.9, False), (None, False)), 1):
            study, sop = f"1.2.3.{n}", f"1.2.3.{n}.1"
            wl.ingest.record_instance(study, sop, f"/spool/{n}.dcm", now=10.0)
            wl.queue.queue_stable_studies(1, now=20.0)
            claimed = wl.queue.claim_study("w", 30, now=21.0)
            assert claimed is not None and claimed.study_uid == study
            image = ImageResult(
                uid=sop,
                eligible=True,
                probabilities={"Effusion": 0.7},
                ood_score=score,
                low_confidence=flagged,
            )
            result = StudyResult(
                study_uid=study,
                status="done",
                findings=(Finding("Effusion", 0.7, 0.5, True, sop),),
                priority_score=50.0,
                priority_level="urgent",
                images=(image,),
            )
            wl.queue.complete_study(study, "w", result, now=22.0)
        rows = {r["study_uid"]: r for r in wl.queries.list_worklist()}
        assert rows["1.2.3.1"]["low_confidence"] is True and rows["1.2.3.1"]["ood_score"] == 7.5
        assert rows["1.2.3.2"]["low_confidence"] is False and rows["1.2.3.2"]["ood_score"] == 0.9
        assert rows["1.2.3.3"]["low_confidence"] is False and rows["1.2.3.3"]["ood_score"] is None
        assert wl.queries.study_detail("1.2.3.1")["low_confidence"] is True
        from dicom_node.commands.worklist import format_table

        table = format_table(list(rows.values())).splitlines()
        assert sum("LOW CONFIDENCE" in line for line in table) == 1
    finally:
        wl.dispose()
