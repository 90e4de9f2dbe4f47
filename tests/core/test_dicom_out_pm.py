"""The Grad-CAM Parametric Map, checked on REAL source headers from ../shared/data/dicom.

Every map is written, validated with dicom3tools' ``dciodvfy`` (exit 0, no "Error" line) and
read back with pydicom and highdicom (``highdicom.pm.ParametricMap``); its values must equal
the heat map given, within the stored precision (1/65535).
"""

from __future__ import annotations

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
    _save,
    header,
    spec,
)
from pydicom.dataset import Dataset

from triage_core.dicom_out import build_pm, default_device_uid, heatmap_from_pm
from triage_core.dicom_out.pm import PM_MAX_STORED, frame_of_reference_uid, stored_values
from triage_core.errors import DicomOutputError
from triage_core.spec import ModelSpec

pytestmark = WARNING_FILTERS

__all__ = ["header", "spec"]  # fixtures

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
#: A hip (a paired body part, Laterality present but empty): Type 2C Laterality kept empty.
HIP = "RG2_JLSL.dcm"


def _algorithm(ds: Dataset) -> Dataset:
    """The Contributing Equipment item of the algorithm (IHE AIR "Processing Algorithm")."""
    items = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(items) == 1, ds.ContributingEquipmentSequence
    return items[0]


def _blob(rows: int, cols: int) -> np.ndarray:
    """A plumbing heat map: a Gaussian blob with its peak (1.0) at a third of each side."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    blob = np.exp(-(((yy - rows / 3) / (rows / 8)) ** 2 + ((xx - cols / 3) / (cols / 8)) ** 2))
    return (blob / blob.max()).astype(np.float32)


@pytest.mark.parametrize(("name", "scale"), [(SIIM, 1), (RG1, 1), (RG1, 4), (HIP, 8)])
def test_pm_round_trip_on_real_source(
    name: str, scale: int, header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    import highdicom as hd

    source = header(name)
    rows, cols = int(source.Rows) // scale, int(source.Columns) // scale
    heatmap = _blob(rows, cols)
    finding = _findings(spec, source.SOPInstanceUID)[0]
    pm = build_pm(heatmap, source, finding, spec, device_uid=DEVICE_UID)
    path = _save(pm, tmp_path / "pm.dcm")
    _dciodvfy(path)

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == PARAMETRIC_MAP and back.Modality == "OT"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID and back.SeriesNumber == 9903
    assert back.PatientID == source.PatientID
    assert (back.Rows, back.Columns) == (rows, cols)
    assert back.BitsAllocated == 16 and back.ContentLabel == "GRADCAM"
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    # the source image is referenced by the frame (derivation) and at the top level
    frame = back.PerFrameFunctionalGroupsSequence[0]
    derived = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert derived.ReferencedSOPClassUID == source.SOPClassUID
    # the mapping of the stored values onto the map's 0..1 scale
    shared = back.SharedFunctionalGroupsSequence[0]
    mapping = shared.RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "GRADCAM"
    assert mapping.RealWorldValueFirstValueMapped == 0
    assert mapping.RealWorldValueLastValueMapped == PM_MAX_STORED
    assert mapping.RealWorldValueSlope == pytest.approx(1 / PM_MAX_STORED)
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    # geometry: a Frame of Reference of the map's own (the CR has none), spacing scaled
    assert "FrameOfReferenceUID" not in source
    assert back.FrameOfReferenceUID == frame_of_reference_uid(source.SOPInstanceUID)
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    base = [float(v) for v in source.get("PixelSpacing", source.get("ImagerPixelSpacing", [1, 1]))]
    expected = [base[0] * source.Rows / rows, base[1] * source.Columns / cols]
    assert spacing == pytest.approx(expected, rel=1e-6)
    # algorithm identity as IHE AI Results asks
    equipment = _algorithm(back)
    assert equipment.DeviceUID == DEVICE_UID
    assert equipment.ManufacturerModelName == "plumbing-test"
    # highdicom reads it back, and the values equal the map within the stored precision
    parsed = hd.pm.ParametricMap.from_dataset(back)
    assert parsed.SOPInstanceUID == pm.SOPInstanceUID
    values = heatmap_from_pm(back)
    assert values.shape == heatmap.shape
    assert np.abs(values - heatmap).max() <= 0.5 / PM_MAX_STORED + 1e-9
    assert np.array_equal(back.pixel_array, stored_values(heatmap))


def test_pm_orientation_follows_patient_orientation(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    source = header(SIIM)
    finding = _findings(spec, source.SOPInstanceUID)[0]
    heatmap = _blob(64, 64)
    orientations = {}
    for value, expected in (
        (["L", "F"], [1, 0, 0, 0, 0, -1]),
        (["R", "F"], [-1, 0, 0, 0, 0, -1]),
        ("", [1, 0, 0, 0, 1, 0]),  # none: nominal
    ):
        source.PatientOrientation = value
        pm = build_pm(heatmap, source, finding, spec)
        shared = pm.SharedFunctionalGroupsSequence[0]
        orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
        orientations[str(value)] = orientation
        assert orientation == expected, value
        _dciodvfy(_save(pm, tmp_path / "pm.dcm"))
    # two maps of one image share its frame of reference; another image gets another one
    assert frame_of_reference_uid("1.2.3") == frame_of_reference_uid("1.2.3")
    assert frame_of_reference_uid("1.2.3") != frame_of_reference_uid("1.2.4")
    assert pydicom.uid.UID(frame_of_reference_uid("1.2.3")).is_valid


def test_pm_default_device_uid_is_the_models(
    header: Callable[[str], Dataset], spec: ModelSpec
) -> None:
    source = header(SIIM)
    finding = _findings(spec, source.SOPInstanceUID)[0]
    pm = build_pm(_blob(32, 32), source, finding, spec)
    assert _algorithm(pm).DeviceUID == default_device_uid(spec)


def test_pm_bad_inputs_raise_precise_errors(
    header: Callable[[str], Dataset], spec: ModelSpec
) -> None:
    source = header(SIIM)
    finding = _findings(spec, source.SOPInstanceUID)[0]
    good = _blob(32, 32)
    cases: list[tuple[object, str]] = [
        ([[0.5]], "numpy array"),
        (good.astype(np.uint16), "floating-point"),
        (good[None], "2-D"),
        (np.zeros((4, 32), np.float32), "each side"),
        (np.full((32, 32), np.nan, np.float32), "non-finite"),
        (good * 2, r"\[0, 1\]"),
        (good - 0.5, r"\[0, 1\]"),
    ]
    for heatmap, message in cases:
        with pytest.raises(DicomOutputError, match=message):
            build_pm(heatmap, source, finding, spec)  # type: ignore[arg-type]
    with pytest.raises(DicomOutputError, match="comes from image"):
        other = _findings(spec, "1.2.3.4")[0]
        build_pm(good, source, other, spec)
    with pytest.raises(DicomOutputError, match="pydicom Dataset"):
        build_pm(good, {}, finding, spec)  # type: ignore[arg-type]
    missing = Dataset()
    missing.update(source)
    del missing.Rows
    with pytest.raises(DicomOutputError, match="Rows"):
        build_pm(good, missing, finding, spec)
    with pytest.raises(DicomOutputError, match="device_uid"):
        build_pm(good, source, finding, spec, device_uid="not a uid")
    with pytest.raises(DicomOutputError, match="series_number"):
        build_pm(good, source, finding, spec, series_number=-1)
    with pytest.raises(DicomOutputError, match="not a Parametric Map"):
        heatmap_from_pm(source)
