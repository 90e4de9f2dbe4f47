"""triage_study on real DICOM files (random 64 px model: plumbing only, not clinical results)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from triage_core.inference import Predictor
from triage_core.pipeline import triage_studies, triage_study

CHEST = "RG1_J2KI.dcm"
CHEST_SIIM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
HIP = "RG2_JPLY_fixed.dcm"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor(tiny_checkpoint, batch_size=4)


def _truncated(dicom_dir: Path, tmp_path: Path) -> Path:
    data = (dicom_dir / "RG1_UNCR.dcm").read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path


def test_mixed_study(dicom_dir: Path, tmp_path: Path, predictor: Predictor) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    instances = [
        ("1.2.3.1", dicom_dir / CHEST),
        ("1.2.3.2", dicom_dir / HIP),
        ("1.2.3.3", _truncated(dicom_dir, tmp_path)),
        ("1.2.3.4", dicom_dir / CHEST_SIIM),
        ("1.2.3.5", text),
    ]
    out = triage_study("1.2.3", instances, predictor)
    result = out.result
    assert result.status == "done"
    assert result.study_uid == "1.2.3"
    assert [im.uid for im in result.images] == [uid for uid, _ in instances]
    images = {im.uid: im for im in result.images}
    assert images["1.2.3.1"].eligible and set(images["1.2.3.1"].probabilities) == set(
        predictor.spec.class_names
    )
    assert not images["1.2.3.2"].eligible and images["1.2.3.2"].reason == "body part HIP"
    # the cause is kept, the spool path is not (worklist rows and API answers carry this text)
    truncated_error = images["1.2.3.3"].error
    assert truncated_error and truncated_error.startswith("TruncatedFileError")
    assert "truncated.dcm" not in truncated_error and str(tmp_path) not in truncated_error
    assert images["1.2.3.5"].error and not images["1.2.3.5"].eligible
    # findings come from eligible images and remember which one
    assert [f.name for f in result.findings] == list(predictor.spec.class_names)
    for finding in result.findings:
        assert finding.source_uid in {"1.2.3.1", "1.2.3.4"}
        assert finding.probability == pytest.approx(
            images[finding.source_uid].probabilities[finding.name]
        )
    assert 0.0 <= result.priority_score <= 100.0
    assert result.priority_level in ("routine", "urgent", "critical")
    assert result.model_name == "random-test-model" and result.model_version == "0"
    assert set(result.timings) == {"read", "preprocess", "inference", "cam", "total"}
    assert all(v >= 0 for v in result.timings.values())
    # Grad-CAM of the top finding, on its own image, at that image's resolution
    top = result.top_finding
    assert top is not None and out.cam_finding == top
    assert out.cam_source_uid == top.source_uid
    source = out.datasets[out.cam_source_uid]
    assert out.cam_overlay is not None
    assert out.cam_overlay.shape == (source.Rows, source.Columns, 3)
    assert out.cam_overlay.dtype.name == "uint8"
    assert set(out.datasets) == {"1.2.3.1", "1.2.3.2", "1.2.3.4"}


def test_study_without_eligible_images(
    dicom_dir: Path, tmp_path: Path, predictor: Predictor
) -> None:
    instances = [
        ("1.5.1", dicom_dir / HIP),
        ("1.5.2", dicom_dir / "RG2_JLSL.dcm"),
        ("1.5.3", _truncated(dicom_dir, tmp_path)),
    ]
    out = triage_study("1.5", instances, predictor)
    assert out.result.status == "not_eligible"
    assert "body part HIP x2" in out.result.reason
    assert "unreadable" in out.result.reason
    assert out.result.findings == ()
    assert out.result.priority_score == 0.0 and out.result.priority_level == "routine"
    assert out.cam_overlay is None and out.cam_finding is None and out.cam_source_uid == ""


def test_without_cam_and_with_duplicates(
    dicom_dir: Path, tmp_path: Path, predictor: Predictor
) -> None:
    copy = tmp_path / "copy.dcm"
    shutil.copy(dicom_dir / CHEST_SIIM, copy)
    instances = [("2.1", dicom_dir / CHEST_SIIM), ("2.1", copy)]
    out = triage_study("2", instances, predictor, with_cam=False)
    assert out.result.status == "done"
    assert len(out.result.images) == 1
    assert out.cam_overlay is None
    assert all(f.source_uid == "2.1" for f in out.result.findings)


def test_empty_study(predictor: Predictor) -> None:
    out = triage_study("3", [], predictor)
    assert out.result.status == "not_eligible"
    assert out.result.reason == "no instances"


def _pngs(cxr14_dir: Path, n: int) -> list[Path]:
    return sorted((cxr14_dir / "256").glob("*.png"))[:n]


def test_png_is_one_more_input_kind(
    cxr14_dir: Path, dicom_dir: Path, tmp_path: Path, predictor: Predictor
) -> None:
    """A PNG export goes through the same stages as a DICOM (no header: eligible as it is)."""
    import numpy as np

    from triage_core.imaging import load_image, to_array

    png = _pngs(cxr14_dir, 1)[0]
    no_suffix = tmp_path / "export"  # the content says PNG
    shutil.copy(png, no_suffix)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    instances = [
        ("4.1", png),
        ("4.2", dicom_dir / CHEST_SIIM),
        ("4.3", no_suffix),
        ("4.4", text),
        ("4.5", dicom_dir / HIP),
    ]
    out = triage_study("4", instances, predictor, kind="auto")
    images = {im.uid: im for im in out.result.images}
    assert [uid for uid in images] == [uid for uid, _ in instances]
    assert images["4.1"].eligible and images["4.1"].reason == "" and not images["4.1"].error
    assert images["4.3"].probabilities == images["4.1"].probabilities
    assert images["4.2"].eligible  # the DICOM beside it is read as DICOM
    assert not images["4.4"].eligible and images["4.4"].reason == "unreadable"
    assert images["4.4"].error.startswith("NotDicomError")
    assert images["4.5"].reason == "body part HIP"  # eligibility still applies to DICOM
    # the probabilities are those of the model on to_array of the decoded PNG
    expected = predictor.predict_tensors(np.stack([to_array(load_image(png), predictor.spec)]))
    got = [images["4.1"].probabilities[name] for name in predictor.spec.class_names]
    np.testing.assert_allclose(got, expected[0], atol=1e-6)
    assert set(out.datasets) == {"4.2", "4.5"}  # data sets are DICOM only
    # the CAM is drawn on whichever image gave the top finding, at its resolution
    assert out.cam_overlay is not None and out.cam_source_uid in {"4.1", "4.2", "4.3"}
    # kind "raster" reads every file as PNG/JPEG; the serving kind "dicom" never does
    assert triage_study("5", [("5.1", no_suffix)], predictor, kind="raster").result.findings
    dicom_only = triage_study("6", [("6.1", png)], predictor).result
    assert dicom_only.status == "not_eligible" and dicom_only.images[0].reason == "unreadable"
    with pytest.raises(ValueError, match="input kind"):
        triage_study("7", [("7.1", png)], predictor, kind="tiff")  # type: ignore[arg-type]


def test_studies_share_one_pass_and_keep_their_results(
    cxr14_dir: Path, dicom_dir: Path, tmp_path: Path, predictor: Predictor
) -> None:
    """triage_studies gives each study what triage_study gives it alone."""
    pngs = _pngs(cxr14_dir, 3)
    truncated = _truncated(dicom_dir, tmp_path)
    studies = [
        ("8.1", [("8.1.1", pngs[0]), ("8.1.2", dicom_dir / CHEST_SIIM)]),
        ("8.2", [("8.2.1", dicom_dir / HIP)]),
        ("8.3", [("8.3.1", pngs[1]), ("8.3.2", pngs[2]), ("8.3.3", truncated)]),
    ]
    together = triage_studies(studies, predictor, kind="auto")
    assert [out.result.study_uid for out in together] == ["8.1", "8.2", "8.3"]
    for (uid, instances), joint in zip(studies, together, strict=True):
        alone = triage_study(uid, instances, predictor, kind="auto")
        assert joint.result.status == alone.result.status
        assert joint.result.priority_level == alone.result.priority_level
        assert joint.result.priority_score == pytest.approx(alone.result.priority_score, abs=1e-4)
        assert [f.name for f in joint.result.findings] == [f.name for f in alone.result.findings]
        for a, b in zip(joint.result.findings, alone.result.findings, strict=True):
            assert (a.present, a.source_uid) == (b.present, b.source_uid)
            assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert joint.cam_source_uid == alone.cam_source_uid
        assert (joint.cam_overlay is None) == (alone.cam_overlay is None)
    assert together[1].result.status == "not_eligible"
    assert triage_studies([], predictor) == []
