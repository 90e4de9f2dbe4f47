"""The Structured Report (TID 1500), checked on REAL source headers from ../shared/data/dicom.

Every report is written, validated with dicom3tools' ``dciodvfy`` (exit 0, no "Error" line),
parsed with DCMTK's ``dsrdump`` and read back with pydicom and highdicom.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_out_support import (
    COMPREHENSIVE_3D_SR,
    DEVICE_UID,
    RG1,
    RG1_J2KR,
    SIIM,
    WARNING_FILTERS,
    _dciodvfy,
    _findings,
    _result,
    _save,
    header,
    spec,
)
from pydicom.dataset import Dataset

from triage_core.dicom_out import (
    CamRegion,
    ReportBuilder,
    build_sc,
    build_sr,
    default_device_uid,
    finding_code,
    findings_from_sr,
    low_confidence_from_sr,
    priority_from_sr,
    regions_from_sr,
)
from triage_core.errors import DicomOutputError, TriageError
from triage_core.spec import Finding, ModelSpec, StudyResult

pytestmark = WARNING_FILTERS

__all__ = ["header", "spec"]  # fixtures


@pytest.mark.parametrize("name", [RG1, SIIM])
def test_sr_round_trip_on_real_source(
    name: str, header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    import highdicom as hd

    source = header(name)
    findings = _findings(spec, source.SOPInstanceUID)
    result = _result(source.StudyInstanceUID, findings)
    sr = build_sr(result, [source], spec, device_uid=DEVICE_UID)
    path = _save(sr, tmp_path / "sr.dcm")
    _dciodvfy(path)

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == COMPREHENSIVE_3D_SR
    assert back.Modality == "SR"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SOPInstanceUID != source.SOPInstanceUID
    assert back.PatientID == source.PatientID
    assert back.PatientName == source.PatientName
    assert back.VerificationFlag == "UNVERIFIED"
    assert back.CompletionFlag == "COMPLETE"
    assert int(back.SeriesNumber) == 9901
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert referenced.ReferencedSOPClassUID == source.SOPClassUID

    algorithm = [
        item
        for item in back.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    ]
    assert len(algorithm) == 1
    assert algorithm[0].PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert algorithm[0].Manufacturer == "cxr-triage"
    assert algorithm[0].ManufacturerModelName == "plumbing-test"
    assert algorithm[0].DeviceUID == DEVICE_UID
    assert "model 7" in list(algorithm[0].SoftwareVersions)

    assert findings_from_sr(back) == {
        f.name: (pytest.approx(f.probability, abs=1e-9), f.present) for f in findings
    }
    assert findings_from_sr(path)["Infiltration"] == (pytest.approx(0.6), True)
    exact = 0.12345678901234568  # more digits than a DS holds: read back from the FD value
    precise = (Finding("Effusion", exact, 0.4, False, source.SOPInstanceUID),)
    precise_sr = build_sr(_result(source.StudyInstanceUID, precise), [source], spec)
    assert findings_from_sr(_save(precise_sr, tmp_path / "precise.dcm")) == {
        "Effusion": (exact, False)
    }
    assert priority_from_sr(back) == (pytest.approx(72.5), "urgent")

    # highdicom reads it as a TID 1500 report; without regions it has no measurement group
    # (a group without an image region breaks OHIF), the judgements are in the Qualitative
    # Evaluations container: one CODE item per finding, then the priority.
    parsed = hd.sr.srread(path)
    assert isinstance(parsed, hd.sr.Comprehensive3DSR)
    report = hd.sr.MeasurementReport.from_sequence(parsed.content)
    assert report.get_image_measurement_groups() == []
    containers = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item
        for item in back.ContentSequence
        if item.ValueType == "CONTAINER"
    }
    assert list(containers) == ["Qualitative Evaluations"]
    judged = [item for item in containers["Qualitative Evaluations"].ContentSequence]
    assert [item.ValueType for item in judged] == ["CODE"] * 4 + ["TEXT"]
    assert [item.ConceptNameCodeSequence[0].CodeValue for item in judged[:4]] == [
        "46621007", "60046008", "112121", "260870009"
    ]  # fmt: skip
    atelectasis = {child.ValueType: child for child in judged[0].ContentSequence}
    assert atelectasis["IMAGE"].RelationshipType == "INFERRED FROM"
    image = atelectasis["IMAGE"].ReferencedSOPSequence[0]
    assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert atelectasis["NUM"].RelationshipType == "HAS PROPERTIES"
    assert "NOT FOR DIAGNOSTIC USE" in judged[-1].TextValue
    assert any(uid == source.SOPInstanceUID for (_, _, uid, _) in parsed.get_evidence()), (
        parsed.get_evidence()
    )


def test_sr_parses_with_dsrdump(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    tool = Path("/usr/bin/dsrdump")
    if not tool.exists():
        pytest.skip("DCMTK dsrdump is not installed")
    source = header(RG1)
    sr = build_sr(
        _result(source.StudyInstanceUID, _findings(spec, source.SOPInstanceUID)), [source], spec
    )
    path = _save(sr, tmp_path / "sr.dcm")
    proc = subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Imaging Measurement Report" in text
    assert "Verification Flag   : UNVERIFIED" in text
    assert '<contains CONTAINER:(,,"Qualitative Evaluations")' in text
    assert '<contains CODE:(,,"Atelectasis")=(52101004,SCT,"Present")>' in text
    assert '<contains CODE:(,,"Pleural effusion")=(272519000,SCT,"Absent")>' in text
    assert '<has properties NUM:(,,"Probability")="0.2" (1,UCUM,"no units")>' in text
    assert '<contains CODE:(,,"Priority")=(URGENT,99CXRTRIAGE,"urgent")>' in text


def test_sr_for_two_image_study_references_both(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    first, second = header(RG1), header(RG1_J2KR)
    assert first.StudyInstanceUID == second.StudyInstanceUID
    findings = (
        Finding("Atelectasis", 0.9, 0.5, True, second.SOPInstanceUID),
        Finding("Effusion", 0.1, 0.4, False, first.SOPInstanceUID),
    )
    result = _result(
        first.StudyInstanceUID, findings, priority_score=95.0, priority_level="critical"
    )
    path = _save(build_sr(result, [first, second], spec), tmp_path / "sr.dcm")
    _dciodvfy(path)
    back = pydicom.dcmread(path)
    refs = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert refs == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert findings_from_sr(back) == {"Atelectasis": (0.9, True), "Effusion": (0.1, False)}
    assert priority_from_sr(back) == (95.0, "critical")


def _normalized(ds: Dataset, keep: set[str]) -> bytes:
    """Encoded bytes with the UIDs we generate and the creation times replaced by placeholders
    (in order of appearance), so that two builds of the same report compare equal."""
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    mapping: dict[str, str] = {}
    fixed = ("SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID")

    def walk(node: Dataset) -> None:
        for element in node:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.VR == "UI" and element.keyword not in fixed:
                value = str(element.value)
                if value not in keep and value != DEVICE_UID:
                    element.value = mapping.setdefault(value, f"9.{len(mapping) + 1}")
            elif element.VR in ("DA", "TM", "DT"):
                if element.keyword.startswith(("Content", "InstanceCreation", "Contribution")):
                    element.value = ""

    walk(back)
    walk(back.file_meta)
    out = io.BytesIO()
    back.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_report_builder_gives_build_srs_content(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    first, second = header(RG1), header(RG1_J2KR)
    keep = {str(first.StudyInstanceUID)} | {
        str(ds.get(k)) for ds in (first, second) for k in ("SeriesInstanceUID", "SOPInstanceUID")
    }
    builder = ReportBuilder(spec, device_uid=DEVICE_UID)
    cases = [
        _result(first.StudyInstanceUID, _findings(spec, first.SOPInstanceUID)),
        _result(
            first.StudyInstanceUID,
            (
                Finding("Atelectasis", 0.1, 0.5, False, first.SOPInstanceUID),
                Finding("Effusion", 0.97, 0.4, True, second.SOPInstanceUID),
                Finding("Infiltration", 0.3, 0.6, False, second.SOPInstanceUID),
            ),
            priority_score=95.0,
            priority_level="critical",
        ),
        # a threshold other than the spec's, and a finding without a source image
        _result(
            first.StudyInstanceUID,
            (
                Finding("Atelectasis", 0.55, 0.55, True, first.SOPInstanceUID),
                Finding("Effusion", 0.2, 0.4, False, ""),
            ),
            priority_score=0.0,
            priority_level="routine",
        ),
    ]
    root = None
    for round_ in range(2):  # the second round reuses the cached root
        for index, result in enumerate(cases):
            sources = [first, second]
            # a region for every present finding with a source image (built per study)
            regions = {
                f.name: CamRegion(f.source_uid, 10.0, 20.0, 100.5, 200.25)
                for f in result.findings
                if f.present and f.source_uid
            }
            reference = build_sr(result, sources, spec, device_uid=DEVICE_UID, regions=regions)
            fast = builder.build(result, sources, regions=regions)
            root = root or builder._root
            assert _normalized(fast, keep) == _normalized(reference, keep)
            assert fast.SOPInstanceUID != reference.SOPInstanceUID
            if round_ == 0:
                path = _save(fast, tmp_path / f"fast{index}.dcm")
                _dciodvfy(path)
                back = pydicom.dcmread(path)
                expected = {f.name: (f.probability, f.present) for f in result.findings}
                assert findings_from_sr(back) == expected
                assert priority_from_sr(back) == (result.priority_score, result.priority_level)
                assert regions_from_sr(back) == regions
                import highdicom as hd

                report = hd.sr.Comprehensive3DSR.from_dataset(back)
                assert report.SOPClassUID == COMPREHENSIVE_3D_SR
    assert builder._root is root  # one root for the model, built once


def _with_ood_reference(spec: ModelSpec, threshold: float) -> ModelSpec:
    """The spec with a (made-up, well-formed) OOD reference: the SR only reports its outcome."""
    from triage_core.ood import _encode

    reference = {
        "method": "pca_mahalanobis",
        "features": 4,
        "components": 2,
        "mean": _encode(np.zeros(4)),
        "basis": _encode(np.eye(2, 4)),
        "variances": [1.0, 1.0],
        "t2_scale": 1.0,
        "residual_scale": 1.0,
        "threshold": threshold,
    }
    return spec.replace(ood=reference)


@pytest.mark.parametrize("flagged", [True, False])
def test_sr_reports_low_confidence(
    flagged: bool, header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    from triage_core.spec import ImageResult

    source = header(RG1)
    ood_spec = _with_ood_reference(spec, threshold=3.0)
    score = 7.25 if flagged else 1.5
    image = ImageResult(
        uid=str(source.SOPInstanceUID),
        eligible=True,
        probabilities={"Atelectasis": 0.8},
        ood_score=score,
        low_confidence=score > 3.0,
    )
    result = _result(
        source.StudyInstanceUID, _findings(ood_spec, source.SOPInstanceUID), images=(image,)
    )
    assert result.low_confidence is flagged
    builder = ReportBuilder(ood_spec, device_uid=DEVICE_UID)
    for name, sr in (
        ("plain", build_sr(result, [source], ood_spec, device_uid=DEVICE_UID)),
        ("fast", builder.build(result, [source])),
    ):
        path = _save(sr, tmp_path / f"{name}.dcm")
        _dciodvfy(path)
        back = pydicom.dcmread(path)
        assert low_confidence_from_sr(back) == (score, flagged)
        assert priority_from_sr(back) == (result.priority_score, result.priority_level)
    # a model without a reference writes neither item
    plain = build_sr(result, [source], spec, device_uid=DEVICE_UID)
    assert low_confidence_from_sr(plain) is None


def test_report_builder_shares_nothing_between_reports(
    header: Callable[[str], Dataset], spec: ModelSpec
) -> None:
    source = header(RG1)
    builder = ReportBuilder(spec, device_uid=DEVICE_UID)
    result = _result(source.StudyInstanceUID, _findings(spec, source.SOPInstanceUID))
    one, two = builder.build(result, [source]), builder.build(result, [source])

    assert one.SOPInstanceUID != two.SOPInstanceUID
    # editing one report, in its cached context, in its judgements and at its root, reaches
    # neither the other nor later ones
    (observer_name,) = [
        i for i in one.ContentSequence if i.get("TextValue") == "cxr-triage plumbing-test"
    ]
    observer_name.TextValue = "edited"
    one.ContentSequence[-1].ContentSequence[0].ContentSequence[0].MeasuredValueSequence[
        0
    ].FloatingPointValue = 0.999
    assert findings_from_sr(one)["Atelectasis"][0] == 0.999  # the edit took
    one.ConceptNameCodeSequence[0].CodeMeaning = "edited"
    one.ContentSequence.append(Dataset())
    three = builder.build(result, [source])
    for other in (two, three):
        assert findings_from_sr(other) == findings_from_sr(build_sr(result, [source], spec))
        texts = [str(i.get("TextValue", "")) for i in other.ContentSequence]
        assert "edited" not in texts and "cxr-triage plumbing-test" in texts
        assert other.ConceptNameCodeSequence[0].CodeMeaning != "edited"
        assert len(other.ContentSequence) == len(one.ContentSequence) - 1


def test_report_builder_checks_inputs_like_build_sr(
    header: Callable[[str], Dataset], spec: ModelSpec
) -> None:
    source = header(RG1)
    builder = ReportBuilder(spec)
    good = _result(source.StudyInstanceUID, _findings(spec, source.SOPInstanceUID))
    with pytest.raises(DicomOutputError, match="not eligible"):
        builder.build(dataclasses.replace(good, status="not_eligible"), [source])
    with pytest.raises(DicomOutputError, match="not among the sources"):
        builder.build(_result(source.StudyInstanceUID, _findings(spec, "1.2.3.4")), [source])
    with pytest.raises(DicomOutputError, match="at least one source"):
        builder.build(good, [])
    with pytest.raises(DicomOutputError, match="expected a ModelSpec"):
        ReportBuilder("resnet18")  # type: ignore[arg-type]


def test_sr_copies_patient_data_from_the_top_findings_image(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    # First received: an instance of a SOP class highdicom does not know (private storage).
    odd = header(RG1_J2KR)
    odd.SOPClassUID = "1.2.826.0.1.3680043.8.498.1"
    odd.PatientName = "Other^Name"
    image = header(RG1)
    findings = (Finding("Effusion", 0.7, 0.4, True, image.SOPInstanceUID),)
    sr = build_sr(_result(image.StudyInstanceUID, findings), [odd, image], spec)
    assert sr.PatientName == image.PatientName
    refs = {
        item.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert refs == {odd.SOPInstanceUID, image.SOPInstanceUID}
    _dciodvfy(_save(sr, tmp_path / "sr.dcm"))


def test_sr_from_full_dataset_has_no_pixels_and_drops_invalid_source_values(
    dicom_dir: Path, spec: ModelSpec, tmp_path: Path
) -> None:
    # The SIIM file has Patient's Age "62" (no unit: invalid AS); it must not reach our SR.
    source = pydicom.dcmread(dicom_dir / SIIM)
    assert "PixelData" in source
    sr = build_sr(_result(source.StudyInstanceUID, _findings(spec, "")), [source], spec)
    assert "PixelData" not in sr
    assert "PatientAge" not in sr
    path = _save(sr, tmp_path / "sr.dcm")  # strict writing validation (conftest) passes
    _dciodvfy(path)
    assert pydicom.dcmread(path).PatientSex == source.PatientSex


def test_sr_and_sc_from_sparse_legacy_header(
    header: Callable[[str], Dataset], dicom_dir: Path, spec: ModelSpec, tmp_path: Path
) -> None:
    """A source without the Type 2 patient/study attributes still gives valid objects."""
    source = header(RG1)
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "BodyPartExamined",
        "Laterality",
        "PatientOrientation",
    ):
        if keyword in source:
            delattr(source, keyword)
    source.PatientSex = "male"  # invalid CS: dropped, written empty
    other_id = Dataset()
    other_id.PatientID = "OTHER-1"
    other_id.TypeOfPatientID = "not a CS value"  # invalid inside a sequence: sequence dropped
    source.OtherPatientIDsSequence = [other_id]
    findings = _findings(spec, source.SOPInstanceUID)
    sr_path = _save(
        build_sr(_result(source.StudyInstanceUID, findings), [source], spec), tmp_path / "sr.dcm"
    )
    _dciodvfy(sr_path)
    back = pydicom.dcmread(sr_path)
    assert back.PatientSex == "" and back.StudyID == "" and back.PatientID == "9RG1"
    assert "OtherPatientIDsSequence" not in back
    overlay = np.zeros((80, 96, 3), np.uint8)
    sc_path = _save(build_sc(overlay, source, findings[0], spec), tmp_path / "sc.dcm")
    _dciodvfy(sc_path)
    sc = pydicom.dcmread(sc_path)
    assert sc.BodyPartExamined == "CHEST" and sc.PatientOrientation == ""


def test_the_sr_needs_no_modality_of_its_sources(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    image, odd = header(RG1), header(RG1_J2KR)
    del odd.Modality  # a malformed instance of the study: the SR only references it by UID
    for source in (image, odd):
        findings = (Finding("Effusion", 0.7, 0.4, True, source.SOPInstanceUID),)
        sr = build_sr(_result(image.StudyInstanceUID, findings), [image, odd], spec)
        _dciodvfy(_save(sr, tmp_path / "sr.dcm"))
        assert findings_from_sr(sr) == {"Effusion": (0.7, True)}


def test_real_file_with_invalid_uid_is_refused(
    header: Callable[[str], Dataset], spec: ModelSpec
) -> None:
    # fo-dicom's dental CR has SOP Instance UID component "01" (leading zero): not a UID.
    source = header("CR-ModalitySequenceLUT.dcm")
    result = _result(source.StudyInstanceUID, _findings(spec, ""))
    with pytest.raises(DicomOutputError, match="SOPInstanceUID .* is not a valid UID"):
        build_sr(result, [source], spec)
    with pytest.raises(DicomOutputError, match="SOPInstanceUID .* is not a valid UID"):
        build_sc(np.zeros((64, 64, 3), np.uint8), source, _findings(spec, "")[0], spec)


def test_sr_private_code_for_unknown_class(
    header: Callable[[str], Dataset], tmp_path: Path
) -> None:
    spec = ModelSpec(
        arch="efficientnet_b0",
        class_names=("Pneumothorax", "No Finding"),
        thresholds=(0.3, 0.5),
        priority_weights=(1.0, 0.0),
        version="1",
    )
    assert finding_code("No Finding").scheme_designator == "99CXRTRIAGE"
    assert finding_code("No Finding").value == "NOFINDING"
    source = header(SIIM)
    findings = (Finding("Pneumothorax", 0.31, 0.3, True), Finding("No Finding", 0.2, 0.5, False))
    path = _save(
        build_sr(_result(source.StudyInstanceUID, findings), [source], spec), tmp_path / "sr.dcm"
    )
    _dciodvfy(path)
    assert findings_from_sr(path) == {"Pneumothorax": (0.31, True), "No Finding": (0.2, False)}


def test_default_device_uid_is_stable_per_model_version(spec: ModelSpec) -> None:
    uid = default_device_uid(spec)
    assert uid == default_device_uid(spec.replace())
    assert uid != default_device_uid(spec.replace(version="8"))
    assert pydicom.uid.UID(uid).is_valid
    # with the weights' digest: new weights under the same version give a new UID too
    with_weights = default_device_uid(spec, "0123456789abcdef")
    assert with_weights == default_device_uid(spec.replace(), "0123456789ABCDEF")
    assert with_weights not in (uid, default_device_uid(spec, "fedcba9876543210"))
    assert with_weights != default_device_uid(spec.replace(version="8"), "0123456789abcdef")
    assert pydicom.uid.UID(with_weights).is_valid and len(with_weights) <= 64


def test_sr_bad_inputs_raise_precise_errors(
    header: Callable[[str], Dataset], spec: ModelSpec
) -> None:
    rg1, siim = header(RG1), header(SIIM)
    findings = _findings(spec, rg1.SOPInstanceUID)
    good = _result(rg1.StudyInstanceUID, findings)
    cases: list[tuple[StudyResult, list[Dataset], dict[str, object], str]] = [
        (
            dataclasses.replace(good, status="not_eligible", reason="lateral view"),
            [rg1],
            {},
            "not eligible .*lateral view",
        ),
        (dataclasses.replace(good, status="failed"), [rg1], {}, "status 'failed'"),
        (dataclasses.replace(good, findings=()), [rg1], {}, "'done' but has no findings"),
        (good, [rg1, siim], {}, "differs from the result's study"),
        (good, [], {}, "at least one source"),
        (good, [rg1, rg1], {}, "duplicate SOPInstanceUID"),
        (good, [rg1], {"device_uid": "1.2.abc"}, "device_uid '1.2.abc' is not a valid UID"),
        (good, [rg1], {"series_number": -1}, "series_number"),
        (dataclasses.replace(good, priority_level="whenever"), [rg1], {}, "priority_level"),
        (
            dataclasses.replace(good, priority_score=150.0),
            [rg1],
            {},
            r"priority_score .*\[0, 100\]",
        ),
        (dataclasses.replace(good, priority_score=float("nan")), [rg1], {}, "priority_score"),
        (dataclasses.replace(good, study_uid="1.2.03"), [rg1], {}, "not a valid UID"),
        (
            dataclasses.replace(good, findings=(Finding("Nodule", 0.9, 0.5, True),)),
            [rg1],
            {},
            "'Nodule' is not one of the model's classes",
        ),
        (
            dataclasses.replace(good, findings=(Finding("Effusion", 1.2, 0.5, True),)),
            [rg1],
            {},
            r"Effusion probability: expected a value in \[0, 1\]",
        ),
        (
            dataclasses.replace(good, findings=(Finding("Effusion", float("nan"), 0.5, False),)),
            [rg1],
            {},
            "Effusion probability",
        ),
        (
            dataclasses.replace(good, findings=(Finding("Effusion", 0.7, 0.5, False),)),
            [rg1],
            {},
            "present=False but probability 0.7",
        ),
        (
            dataclasses.replace(good, findings=(findings[0], findings[0])),
            [rg1],
            {},
            "duplicate findings",
        ),
        (
            dataclasses.replace(good, findings=(Finding("Effusion", 0.7, 0.5, True, "1.2.3.4"),)),
            [rg1],
            {},
            "'1.2.3.4', which is not among the sources",
        ),
    ]
    for result, sources, kwargs, message in cases:
        with pytest.raises(DicomOutputError, match=message):
            build_sr(result, sources, spec, **kwargs)  # type: ignore[arg-type]

    no_uid = header(RG1)
    del no_uid.SOPInstanceUID
    with pytest.raises(DicomOutputError, match=r"sources\[0\]: required attribute SOPInstanceUID"):
        build_sr(good, [no_uid], spec)
    with pytest.raises(DicomOutputError, match="expected a sequence of pydicom Datasets"):
        build_sr(good, rg1, spec)  # type: ignore[arg-type]
    with pytest.raises(DicomOutputError, match="expected a pydicom Dataset, got str"):
        build_sr(good, ["RG1_UNCR.dcm"], spec)  # type: ignore[list-item]
    unknown_class = header(RG1)
    unknown_class.SOPClassUID = "1.2.3.4.5"
    with pytest.raises(DicomOutputError, match="SR could not be built"):
        build_sr(good, [unknown_class], spec)
    assert issubclass(DicomOutputError, TriageError)


def test_reading_back_something_else_is_refused(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    image = header(SIIM)
    with pytest.raises(DicomOutputError, match="not a Structured Report"):
        findings_from_sr(image)
    with pytest.raises(DicomOutputError, match="not a Structured Report"):
        priority_from_sr(image)
    with pytest.raises(DicomOutputError, match="cannot read SR"):
        findings_from_sr(tmp_path / "missing.dcm")
