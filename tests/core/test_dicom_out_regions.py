"""Image regions: the rule that turns a class activation map into a box on the source image,
and the SR's TID 1410 region groups (``dciodvfy``, ``dsrdump``, highdicom read-back)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_out_support import (
    DEVICE_UID,
    RG1,
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
    REGION_FRACTION,
    CamRegion,
    build_sr,
    cam_region,
    findings_from_sr,
    regions_from_sr,
)
from triage_core.errors import DicomOutputError
from triage_core.spec import ModelSpec

pytestmark = WARNING_FILTERS

__all__ = ["header", "spec"]  # fixtures


def test_region_is_the_box_of_the_peaks_component_scaled_to_the_source() -> None:
    heatmap = np.zeros((100, 50), np.float32)
    heatmap[20:40, 10:30] = 0.6  # above half the peak, joined to the peak
    heatmap[25, 15] = 1.0  # the peak
    heatmap[70:90, 35:45] = 0.9  # above half the peak too, but not connected to it
    heatmap[50:60, 0:5] = 0.49  # below half the peak
    region = cam_region(heatmap, rows=1000, columns=400, source_uid="1.2.3")
    assert region == CamRegion("1.2.3", left=10 * 8, top=20 * 10, right=30 * 8, bottom=40 * 10)
    # the same map at another resolution gives the same box on the source
    fine = np.kron(heatmap, np.ones((2, 2), np.float32))
    assert cam_region(fine, 1000, 400, "1.2.3") == region
    # a diagonal neighbour belongs to the component (8-connectivity)
    heatmap[40, 30] = 0.7
    grown = cam_region(heatmap, 1000, 400, "1.2.3")
    assert grown is not None and (grown.right, grown.bottom) == (31 * 8, 41 * 10)
    # a lower fraction takes in the weaker pixels that touch the component
    heatmap[40:50, 0:10] = 0.4
    low = cam_region(heatmap, 1000, 400, "1.2.3", fraction=0.3)
    assert low is not None and low.left == 0 and low.bottom == 60 * 10
    assert REGION_FRACTION == 0.5


def test_region_edge_cases() -> None:
    assert cam_region(np.zeros((8, 8), np.float32), 64, 64, "1.2") is None
    whole = cam_region(np.ones((8, 8), np.float32), 64, 48, "1.2")
    assert whole == CamRegion("1.2", 0.0, 0.0, 48.0, 64.0)
    assert whole.polyline().tolist() == [[0, 0], [48, 0], [48, 64], [0, 64], [0, 0]]
    for bad, message in (
        (np.zeros(8), "2-D"),
        (np.full((8, 8), np.inf), "non-finite"),
    ):
        with pytest.raises(DicomOutputError, match=message):
            cam_region(bad, 64, 64, "1.2")
    with pytest.raises(DicomOutputError, match="rows"):
        cam_region(np.ones((8, 8)), 0, 64, "1.2")
    with pytest.raises(DicomOutputError, match="fraction"):
        cam_region(np.ones((8, 8)), 64, 64, "1.2", fraction=0.0)
    with pytest.raises(DicomOutputError, match="left < right"):
        CamRegion("1.2", 10, 0, 10, 5)
    with pytest.raises(DicomOutputError, match="finite"):
        CamRegion("1.2", float("nan"), 0, 10, 5)


@pytest.mark.parametrize("name", [RG1, SIIM])
def test_sr_carries_a_region_per_present_finding(
    name: str, header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    import highdicom as hd

    source = header(name)
    findings = _findings(spec, source.SOPInstanceUID)  # Atelectasis, Infiltration present
    rows, cols = int(source.Rows), int(source.Columns)
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[10:30, 5:20] = 1.0
    region = cam_region(heatmap, rows, cols, source.SOPInstanceUID)
    assert region is not None
    regions = {"Atelectasis": region, "Infiltration": region}
    sr = build_sr(
        _result(source.StudyInstanceUID, findings), [source], spec, device_uid=DEVICE_UID,
        regions=regions,
    )  # fmt: skip
    path = _save(sr, tmp_path / "sr.dcm")
    _dciodvfy(path)
    back = pydicom.dcmread(path)
    read = regions_from_sr(back)
    assert set(read) == {"Atelectasis", "Infiltration"}
    for got in read.values():  # GraphicData is FL (32-bit): equal within its precision
        assert got.source_uid == source.SOPInstanceUID
        expected = (region.left, region.top, region.right, region.bottom)
        assert (got.left, got.top, got.right, got.bottom) == pytest.approx(expected, rel=1e-6)
    assert findings_from_sr(back) == {f.name: (f.probability, f.present) for f in findings}
    # highdicom sees TID 1410 groups with a POLYLINE on the source image and "Bounded by"
    report = hd.sr.Comprehensive3DSR.from_dataset(back)
    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        assert group.reference_type == hd.sr.CodedConcept("111030", "DCM", "Image Region")
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        evaluation = group.get_qualitative_evaluations()[0]
        assert evaluation.value.value == "52101004"  # Present
        # the probability, named after the finding: what OHIF labels the region with
        name = str(group.tracking_identifier).removesuffix(" region")
        finding = next(f for f in findings if f.name == name)
        (probability,) = group.get_measurements()
        assert probability.name.meaning == f"{name} probability"
        assert float(probability.value) == pytest.approx(finding.probability)
    # OHIF 3.13 fails on a report with a measurement group without a region of its own:
    # every group under Imaging Measurements has one
    (container,) = [i for i in back.ContentSequence if i.ValueType == "CONTAINER"][:1]
    assert container.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
    assert len(container.ContentSequence) == 2
    for group in container.ContentSequence:
        assert any(item.ValueType == "SCOORD" for item in group.ContentSequence)
    # DCMTK parses it; the region is an SCOORD on the image
    dsrdump = shutil.which("dsrdump")
    if dsrdump is not None:
        out = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count('SCOORD:(,,"Image Region")=(POLYLINE') == 2
        assert "Atelectasis region" in out.stdout and "Bounded by" in out.stdout


def test_sr_regions_are_checked(header: Callable[[str], Dataset], spec: ModelSpec) -> None:
    source = header(SIIM)
    findings = _findings(spec, source.SOPInstanceUID)
    result = _result(source.StudyInstanceUID, findings)
    box = CamRegion(source.SOPInstanceUID, 0, 0, 10, 10)
    cases: list[tuple[object, str]] = [
        ({"Effusion": box}, "judged absent"),
        ({"Pneumothorax": box}, "not findings of the result"),
        ({"Atelectasis": CamRegion("1.2.3", 0, 0, 10, 10)}, "not among the sources"),
        ({"Atelectasis": CamRegion(source.SOPInstanceUID, 0, 0, 1e6, 10)}, "exceeds"),
        ({"Atelectasis": (0, 0, 10, 10)}, "CamRegion"),
        ([box], "mapping"),
    ]
    for regions, message in cases:
        with pytest.raises(DicomOutputError, match=message):
            build_sr(result, [source], spec, regions=regions)  # type: ignore[arg-type]
