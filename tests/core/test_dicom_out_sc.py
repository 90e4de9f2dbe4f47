"""The Grad-CAM Secondary Capture, checked on REAL source headers from ../shared/data/dicom.

Every image is written, validated with dicom3tools' ``dciodvfy`` (exit 0, no "Error" line) and
read back with pydicom and highdicom; a DCMTK ``storescp`` takes the SR and the SC.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_out_support import (
    RG1,
    SIIM,
    WARNING_FILTERS,
    _dciodvfy,
    _findings,
    _overlay_from,
    _result,
    _save,
    header,
    spec,
)
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from triage_core.dicom_out import (
    build_sc,
    build_sr,
    burn_in_caption,
)
from triage_core.errors import DicomOutputError
from triage_core.spec import ModelSpec

pytestmark = WARNING_FILTERS

__all__ = ["header", "spec"]  # fixtures


@pytest.mark.parametrize("name", [SIIM, RG1])
def test_sc_round_trip_on_real_source(
    name: str,
    header: Callable[[str], Dataset],
    dicom_dir: Path,
    spec: ModelSpec,
    tmp_path: Path,
) -> None:
    import highdicom as hd

    source = header(name)
    overlay = _overlay_from(dicom_dir, name, step=2 if name == SIIM else 4)  # <= 512 px
    finding = _findings(spec, source.SOPInstanceUID)[0]
    sc = build_sc(overlay, source, finding, spec, series_number=42, instance_number=3)
    path = _save(sc, tmp_path / "sc.dcm")
    _dciodvfy(path)

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.PatientID == source.PatientID
    assert (int(back.SeriesNumber), int(back.InstanceNumber)) == (42, 3)
    assert back.PhotometricInterpretation == "RGB"
    assert back.SamplesPerPixel == 3
    assert (back.Rows, back.Columns) == overlay.shape[:2]
    assert back.BodyPartExamined == "CHEST"
    assert back.BurnedInAnnotation == "YES"
    assert "DERIVED" in back.ImageType
    assert "Atelectasis" in back.ImageComments and "0.81" in back.ImageComments
    assert "NOT FOR DIAGNOSTIC USE" in back.ImageComments
    assert "Grad-CAM" in back.DerivationDescription
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert any(
        item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        for item in back.ContributingEquipmentSequence
    )

    pixels = back.pixel_array
    assert pixels.dtype == np.uint8 and pixels.shape == overlay.shape
    changed_rows = np.flatnonzero(np.any(pixels != overlay, axis=(1, 2)))
    assert changed_rows.size > 0, "no caption was burned in"
    assert changed_rows.max() < overlay.shape[0] // 10, changed_rows.max()
    np.testing.assert_array_equal(
        pixels[changed_rows.max() + 1 :], overlay[changed_rows.max() + 1 :]
    )

    image = hd.imread(path)
    assert image.get_frame(1).shape == overlay.shape


def test_sc_keeps_lossy_flag_and_valid_orientation(
    header: Callable[[str], Dataset], dicom_dir: Path, spec: ModelSpec, tmp_path: Path
) -> None:
    siim = header(SIIM)  # JPEG baseline source: LossyImageCompression 01, empty orientation
    sc = build_sc(_overlay_from(dicom_dir, SIIM, 4), siim, _findings(spec, "")[1], spec)
    assert sc.LossyImageCompression == "01"
    assert sc.PatientOrientation == ""
    rg1 = header(RG1)  # uncompressed, orientation L\F
    overlay = np.zeros((96, 80, 3), np.uint8)
    sc = build_sc(overlay, rg1, _findings(spec, rg1.SOPInstanceUID)[2], spec)
    assert "LossyImageCompression" not in sc
    assert list(sc.PatientOrientation) == ["L", "F"]
    _dciodvfy(_save(sc, tmp_path / "sc.dcm"))


def test_sc_at_full_source_resolution(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    source = header(RG1)
    rows, cols = int(source.Rows), int(source.Columns)
    overlay = np.zeros((rows, cols, 3), np.uint8)
    overlay[..., 0] = np.linspace(0, 255, cols, dtype=np.uint8)[None, :]
    overlay[..., 2] = np.linspace(255, 0, rows, dtype=np.uint8)[:, None]
    path = _save(build_sc(overlay, source, _findings(spec, "")[0], spec), tmp_path / "sc.dcm")
    _dciodvfy(path)
    back = pydicom.dcmread(path)
    assert (back.Rows, back.Columns) == (1955, 1841)
    np.testing.assert_array_equal(back.pixel_array[200:], overlay[200:])


def test_small_overlay_is_stored_without_caption(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    overlay = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    path = _save(build_sc(overlay, header(SIIM), _findings(spec, "")[0], spec), tmp_path / "sc.dcm")
    back = pydicom.dcmread(path)
    assert back.BurnedInAnnotation == "NO"
    np.testing.assert_array_equal(back.pixel_array, overlay)
    assert "Atelectasis" in back.ImageComments


def test_burn_in_caption_falls_back_to_shorter_text() -> None:
    image = np.full((128, 128, 3), 77, np.uint8)
    captioned, burned = burn_in_caption(image, ["x" * 500, "short"])
    assert burned
    assert np.any(captioned[:12] != 77) and np.all(captioned[20:] == 77)
    assert np.all(image == 77), "the input must not be modified"
    _, burned = burn_in_caption(image, ["x" * 500])
    assert not burned


def test_dcmtk_storescp_accepts_both_objects(
    header: Callable[[str], Dataset], spec: ModelSpec, tmp_path: Path
) -> None:
    """A real DCMTK C-STORE over loopback: a PACS-like SCP takes the SR and the SC."""
    storescp, storescu = Path("/usr/bin/storescp"), Path("/usr/bin/storescu")
    if not (storescp.exists() and storescu.exists()):
        pytest.skip("DCMTK storescp/storescu are not installed")
    source = header(SIIM)
    findings = _findings(spec, source.SOPInstanceUID)
    sr = build_sr(_result(source.StudyInstanceUID, findings), [source], spec)
    sc = build_sc(np.zeros((128, 128, 3), np.uint8), source, findings[0], spec)
    files = [_save(sr, tmp_path / "sr.dcm"), _save(sc, tmp_path / "sc.dcm")]
    received = tmp_path / "received"
    received.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "TCP_NODELAY": "1"}
    server = subprocess.Popen(
        [str(storescp), "-aet", "PACS", "-od", str(received), str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):  # wait until the SCP listens
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        # -R: propose the files' own SOP classes. DCMTK 3.6.7's default proposal list lacks
        # Comprehensive 3D SR ("No presentation context for: (SR3)"); the SCP accepts it.
        sent = subprocess.run(
            [str(storescu), "-R", "-aec", "PACS", "127.0.0.1", str(port), *map(str, files)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    stored = {pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()}
    assert stored == {sr.SOPInstanceUID, sc.SOPInstanceUID}


def test_sc_bad_inputs_raise_precise_errors(
    header: Callable[[str], Dataset], spec: ModelSpec
) -> None:
    source = header(SIIM)
    finding = _findings(spec, source.SOPInstanceUID)[0]
    rgb = np.zeros((64, 64, 3), np.uint8)
    cases: list[tuple[object, str]] = [
        (rgb.astype(np.float32), "expected dtype uint8 .*got float32"),
        (rgb[..., 0], r"expected shape \(H, W, 3\), got \(64, 64\)"),
        (np.zeros((64, 64, 4), np.uint8), r"got \(64, 64, 4\)"),
        (np.zeros((4, 64, 3), np.uint8), r"4x64 pixels"),
        (rgb.tolist(), "expected a numpy array, got list"),
    ]
    for overlay, message in cases:
        with pytest.raises(DicomOutputError, match=message):
            build_sc(overlay, source, finding, spec)  # type: ignore[arg-type]

    other = dataclasses.replace(finding, source_uid="1.2.3.4")
    with pytest.raises(DicomOutputError, match="comes from image 1.2.3.4"):
        build_sc(rgb, source, other, spec)
    with pytest.raises(DicomOutputError, match="not one of the model's classes"):
        build_sc(rgb, source, dataclasses.replace(finding, name="Mass"), spec)
    no_study = header(SIIM)
    del no_study.StudyInstanceUID
    with pytest.raises(DicomOutputError, match="source: required attribute StudyInstanceUID"):
        build_sc(rgb, no_study, finding, spec)
    with pytest.raises(DicomOutputError, match="instance_number"):
        build_sc(rgb, source, finding, spec, instance_number=True)  # type: ignore[arg-type]
