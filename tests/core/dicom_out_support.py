"""Shared parts of the DICOM output tests (SR, SC and PM files): real source headers from
../shared/data/dicom, hand-made findings, ``dciodvfy``.

The findings are hand-made (plumbing: no model, no clinical claim).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from triage_core.spec import Finding, ModelSpec, StudyResult

RG1 = "RG1_UNCR.dcm"
RG1_J2KR = "RG1_J2KR.dcm"
SIIM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DEVICE_UID = "2.25.123456789012345678901234567890"

# Source headers carry single-component person names, which highdicom warns about, and some
# real (or deliberately broken) headers hold invalid values pydicom warns about on read: harmless.
#: Every output test file sets these as its ``pytestmark``.
WARNING_FILTERS = [
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec(
        arch="resnet18",
        input_size=64,
        name="plumbing-test",
        version="7",
        thresholds=(0.5, 0.4, 0.6),
    )


@pytest.fixture(scope="module")
def header(dicom_dir: Path) -> Callable[[str], Dataset]:
    def read(name: str) -> Dataset:
        return pydicom.dcmread(dicom_dir / name, stop_before_pixels=True)

    return read


def _findings(spec: ModelSpec, source_uid: str) -> tuple[Finding, ...]:
    probabilities = (0.8123456789, 0.2, 0.6)  # chosen by hand; 0.6 sits exactly on its threshold
    return tuple(
        Finding(name, p, t, p >= t, source_uid)
        for name, p, t in zip(spec.class_names, probabilities, spec.thresholds, strict=True)
    )


def _result(study_uid: str, findings: tuple[Finding, ...], **changes: object) -> StudyResult:
    result = StudyResult(
        study_uid=study_uid,
        status="done",
        findings=findings,
        priority_score=72.5,
        priority_level="urgent",
        model_name="plumbing-test",
        model_version="7",
    )
    return dataclasses.replace(result, **changes)  # type: ignore[arg-type]


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _dciodvfy(path: Path) -> str:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert proc.returncode == 0, output
    assert errors == [], output
    return output


def _overlay_from(dicom_dir: Path, name: str, step: int) -> np.ndarray:
    """A plumbing overlay: the real image, subsampled, in gray with a synthetic red blob."""
    pixels = pydicom.dcmread(dicom_dir / name).pixel_array[::step, ::step].astype(np.float32)
    gray = (255 * (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0)).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    h, w = gray.shape
    rgb[h // 3 : h // 2, w // 4 : w // 2, 0] = 255
    return np.ascontiguousarray(rgb)
