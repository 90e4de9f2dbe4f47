"""Real DICOM and PNG files through triage_core.imaging (read in place from ../shared/data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from triage_core.errors import ImageReadError, NotDicomError, TruncatedFileError
from triage_core.imaging import (
    check_eligibility,
    is_raster,
    letterbox_geometry,
    load_image,
    load_raster,
    read_dataset,
    to_tensor,
    unletterbox,
    window_dicom,
)
from triage_core.models import default_spec

SIIM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _all_dicom(dicom_dir: Path) -> list[Path]:
    files = sorted(dicom_dir.glob("*.dcm"))
    assert len(files) >= 10
    return files


def test_every_shared_file_loads(dicom_dir: Path) -> None:
    for path in _all_dicom(dicom_dir):
        image = load_image(path)
        ds = read_dataset(path, stop_before_pixels=True)
        assert image.dtype == np.float32
        assert image.shape == (ds.Rows, ds.Columns), path.name
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0, path.name
        # display-ready: a real radiograph uses a good part of the range
        assert float(image.max()) - float(image.min()) > 0.5, path.name


def test_lossless_jpeg2000_equals_uncompressed(dicom_dir: Path) -> None:
    ref = load_image(dicom_dir / "RG1_UNCR.dcm")
    assert np.array_equal(load_image(dicom_dir / "RG1_J2KR.dcm"), ref)
    lossy = load_image(dicom_dir / "RG1_J2KI.dcm")
    assert np.corrcoef(lossy.ravel(), ref.ravel())[0, 1] > 0.99
    assert not np.array_equal(lossy, ref)


def test_monochrome1_is_inverted(dicom_dir: Path) -> None:
    twin = window_dicom(pydicom.dcmread(dicom_dir / SIIM))
    inverted = window_dicom(pydicom.dcmread(dicom_dir / "Fake_MONOHR1.dcm"))
    np.testing.assert_allclose(inverted, 1.0 - twin, atol=1e-6)
    # after standardisation the order of grey levels is still reversed
    sample = (slice(None, None, 9), slice(None, None, 9))
    a = load_image(dicom_dir / SIIM)[sample].ravel()
    b = load_image(dicom_dir / "Fake_MONOHR1.dcm")[sample].ravel()
    assert np.corrcoef(a, b)[0, 1] < -0.95


def test_rle_equals_jpeg_twin(dicom_dir: Path) -> None:
    np.testing.assert_array_equal(
        load_image(dicom_dir / "siim_cr_chest_rle_derived.dcm"), load_image(dicom_dir / SIIM)
    )


def test_jpeg_ls_equals_jpeg_lossless(dicom_dir: Path) -> None:
    np.testing.assert_array_equal(
        load_image(dicom_dir / "RG2_JLSL.dcm"), load_image(dicom_dir / "RG2_JPLL.dcm")
    )


def test_modality_lut_sequence_is_applied(dicom_dir: Path) -> None:
    from pydicom.pixels import apply_modality_lut

    path = dicom_dir / "CR-ModalitySequenceLUT.dcm"
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds
    image = load_image(ds)
    # the LUT output, percentile-windowed and inverted (MONOCHROME1), orders pixels the same way
    lut_values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    sample = (slice(None, None, 7), slice(None, None, 7))
    corr = np.corrcoef(image[sample].ravel(), -lut_values[sample].ravel())[0, 1]
    assert corr > 0.95
    # and differs from ignoring the LUT (raw stored values)
    raw = ds.pixel_array.astype(np.float64)
    assert not np.allclose(np.corrcoef(raw[sample].ravel(), lut_values[sample].ravel())[0, 1], 1.0)


def test_window_is_applied(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "RG2_JPLL.dcm")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(np.float32)
    expected = np.clip((raw - (center - 0.5 - (width - 1) / 2)) / (width - 1), 0, 1)
    np.testing.assert_allclose(window_dicom(ds), expected, atol=1e-5)


def test_pixel_padding_is_ignored(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "RG2_JPLL.dcm")
    arr = ds.pixel_array.copy()
    arr[:100, :] = 1023
    ds.PixelData = arr.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    del ds.WindowCenter, ds.WindowWidth
    without = window_dicom(ds)
    ds.PixelPaddingValue = 1023
    with_pad = window_dicom(ds)
    assert float(load_image(ds)[:100].max()) == 0.0
    assert float(with_pad[:100].max()) == 0.0
    # padding no longer drags the percentile window: the body is brighter than before
    assert float(with_pad[200:].mean()) != pytest.approx(float(without[200:].mean()), abs=1e-3)


def test_legacy_file_without_preamble_or_meta(dicom_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "RG1_UNCR.dcm")
    legacy = tmp_path / "legacy.dcm"
    body = pydicom.Dataset()
    body.update(ds)
    pydicom.dcmwrite(legacy, body, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert legacy.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(load_image(legacy), load_image(dicom_dir / "RG1_UNCR.dcm"))


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG2_JPLL.dcm", "RG1_J2KR.dcm"])
def test_truncated_copy_raises_precise_error(dicom_dir: Path, tmp_path: Path, name: str) -> None:
    data = (dicom_dir / name).read_bytes()
    broken = tmp_path / f"cut-{name}"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedFileError) as info:
        load_image(broken)
    assert str(broken) in str(info.value)


def test_non_dicom_file_raises(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is a radiology report, not an image\n" * 20)
    with pytest.raises(NotDicomError) as info:
        load_image(text)
    assert str(text) in str(info.value)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(NotDicomError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "missing.dcm")


def test_eligibility(dicom_dir: Path) -> None:
    for name in ("RG2_JLSL.dcm", "RG2_JPLL.dcm", "RG2_JPLY_fixed.dcm"):
        assert check_eligibility(read_dataset(dicom_dir / name, True)) == (False, "body part HIP")
    for name in ("RG1_UNCR.dcm", SIIM, "siim_cr_chest_rle_derived.dcm"):
        assert check_eligibility(read_dataset(dicom_dir / name, True)) == (True, "")
    ds = read_dataset(dicom_dir / SIIM, True)
    ds.ViewPosition = "LL"
    assert check_eligibility(ds) == (False, "lateral view")
    ds.ViewPosition = "PA"
    ds.Modality = "CT"
    assert check_eligibility(ds) == (False, "modality CT")
    ds.Modality = "DX"
    ds.NumberOfFrames = 4
    assert check_eligibility(ds) == (False, "multi-frame")


def test_png_loads(cxr14_dir: Path) -> None:
    png = sorted((cxr14_dir / "full").glob("*.png"))[0]
    image = load_image(png)
    assert image.shape == (1024, 1024) and image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0


def test_renamed_png_is_detected_by_content(cxr14_dir: Path, tmp_path: Path) -> None:
    png = sorted((cxr14_dir / "256").glob("*.png"))[0]
    odd = tmp_path / "image.dcm"
    shutil.copyfile(png, odd)  # a temporary copy in tmp_path, removed by pytest
    np.testing.assert_array_equal(load_image(odd), load_image(png))


def test_raster_inputs_are_told_from_dicom(
    cxr14_dir: Path, dicom_dir: Path, tmp_path: Path
) -> None:
    """The ``auto`` input kind of the pipeline: suffix first, then the first bytes."""
    png = sorted((cxr14_dir / "256").glob("*.png"))[0]
    odd = tmp_path / "image.dcm"
    shutil.copyfile(png, odd)
    assert is_raster(png) and is_raster(odd) and is_raster(tmp_path / "absent.PNG")
    assert not is_raster(sorted(dicom_dir.glob("*.dcm"))[0])
    assert not is_raster(tmp_path / "absent")  # unopenable: reading it as DICOM says why
    np.testing.assert_array_equal(load_raster(odd), load_image(png))
    with pytest.raises(ImageReadError, match="no such file"):
        load_raster(tmp_path / "absent.png")
    with pytest.raises(NotDicomError, match="neither DICOM nor"):
        load_raster(sorted(dicom_dir.glob("*.dcm"))[0])


def test_to_tensor_letterbox_and_normalisation() -> None:
    spec = default_spec("resnet18").replace(input_size=64)
    image = np.ones((100, 50), dtype=np.float32)  # aspect 2: letterboxed, not stretched
    tensor = to_tensor(image, spec)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    box = letterbox_geometry(100, 50, 64)
    assert (box.new_h, box.new_w, box.top, box.left) == (64, 32, 0, 16)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    restored = tensor * std + mean
    assert torch.allclose(restored[:, :, 16:48], torch.ones(1), atol=1e-5)
    assert torch.allclose(restored[:, :, :16], torch.zeros(1), atol=1e-5)
    assert torch.allclose(restored[:, :, 48:], torch.zeros(1), atol=1e-5)
    assert torch.allclose(restored[0], restored[1], atol=1e-6)
    back = unletterbox(restored[0].numpy(), 100, 50)
    assert back.shape == (100, 50)
    assert np.allclose(back, 1.0, atol=1e-5)


def test_to_tensor_rejects_colour() -> None:
    spec = default_spec("resnet18")
    with pytest.raises(ValueError, match="2-D"):
        to_tensor(np.zeros((10, 10, 3), dtype=np.float32), spec)


def test_near_square_images_are_stretched_like_the_nih_exports() -> None:
    # NIH resized its originals (aspect 0.82-1.22) to 1024 x 1024 squares, without padding
    box = letterbox_geometry(1955, 1841, 224)
    assert (box.new_h, box.new_w, box.top, box.left) == (224, 224, 0, 0)
    spec = default_spec("resnet18").replace(input_size=64)
    tensor = to_tensor(np.ones((70, 60), dtype=np.float32), spec)
    restored = tensor[0] * spec.std[0] + spec.mean[0]
    assert torch.allclose(restored, torch.ones(1), atol=1e-5)  # no padding anywhere
    back = unletterbox(restored.numpy(), 70, 60)
    assert back.shape == (70, 60)


def test_training_pngs_take_the_unchanged_path(cxr14_dir: Path) -> None:
    """The shared 256 px PNGs (what the model learns from) are not touched by the export step:
    their tensor is one antialiased bilinear resize of the 8-bit image, as before."""
    import torch.nn.functional as F

    spec = default_spec("resnet18")
    png = sorted((cxr14_dir / "256").glob("*.png"))[0]
    image = load_image(png)
    assert image.shape == (256, 256)
    src = torch.from_numpy(image)[None, None]
    ref = F.interpolate(src, size=(224, 224), mode="bilinear", antialias=True).clamp(0, 1)[0, 0]
    got = to_tensor(image, spec)[0] * spec.std[0] + spec.mean[0]
    assert torch.allclose(got, ref, atol=1e-5)


def test_dicom_is_rendered_like_the_nih_exports(dicom_dir: Path, cxr14_dir: Path) -> None:
    """RG1's header window (centre 15000, width 30000) leaves the lungs mid-grey; after
    standardisation its grey levels sit where the NIH PNGs have theirs, in 8-bit steps."""
    from triage_core.imaging import NIH_LANDMARKS, NIH_PERCENTILES

    windowed = window_dicom(pydicom.dcmread(dicom_dir / "RG1_UNCR.dcm"))
    image = load_image(dicom_dir / "RG1_UNCR.dcm")
    assert np.allclose(image * 255, np.rint(image * 255), atol=1e-3)
    before = np.percentile(windowed, NIH_PERCENTILES)
    after = np.percentile(image, NIH_PERCENTILES)
    target = np.asarray(NIH_LANDMARKS)
    assert np.abs(after - target).max() < 0.01
    assert np.abs(before - target).max() > 0.2
    # and the landmarks are those of the shared PNGs (first 50, mean percentiles)
    pngs = sorted((cxr14_dir / "256").glob("*.png"))[:50]
    mean = np.mean([np.percentile(load_image(p), NIH_PERCENTILES) for p in pngs], axis=0)
    assert np.abs(mean - target).max() < 0.05


def test_large_images_are_reduced_with_lanczos_first() -> None:
    from triage_core.imaging import EXPORT_SIZE, export_resize

    spec = default_spec("resnet18").replace(input_size=64)
    rng = np.random.default_rng(0)
    big = rng.random((600, 600)).astype(np.float32)
    via_export = to_tensor(export_resize(big, EXPORT_SIZE, EXPORT_SIZE), spec)
    assert torch.allclose(to_tensor(big, spec), via_export, atol=1e-6)
