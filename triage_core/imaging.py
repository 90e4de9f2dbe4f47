"""From a DICOM file, a ``pydicom.Dataset`` or a PNG/JPEG to a display-ready image and a tensor.

The pixel pipeline (``PREPROCESSING_VERSION`` in :mod:`triage_core.spec`):

1. decode (pydicom 3 with the pylibjpeg and pyjpegls plugins: JPEG baseline/extended/lossless,
   JPEG-LS, JPEG 2000, RLE, deflate, native);
2. pixel padding (``PixelPaddingValue`` / ``PixelPaddingRangeLimit``) is masked out;
3. Modality LUT: rescale slope/intercept or the Modality LUT Sequence;
4. VOI LUT: the first window (``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``) or the VOI LUT
   Sequence; without either, a robust window from the 0.5th to the 99.5th percentile of the
   non-padding pixels;
5. ``MONOCHROME1`` is inverted, so that bone is bright as a reader sees it; padding becomes 0;
6. :func:`to_tensor` keeps the aspect ratio: resize so the long side equals the model's input
   size (antialiased bilinear), pad the short side symmetrically with 0, copy gray into three
   channels and normalise with the checkpoint's mean and std.

The same :func:`to_tensor` is used for training and serving.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from triage_core.errors import (
    ImageReadError,
    NotDicomError,
    PixelDecodeError,
    TruncatedFileError,
    UnsupportedImageError,
)
from triage_core.spec import ModelSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Modalities we run inference on.
ELIGIBLE_MODALITIES = frozenset({"CR", "DX"})
#: Body Part Examined values that mean "chest".
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_TO_ABDOMEN"})
#: Frontal views.
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"})
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Letterbox:
    """How an ``height x width`` image sits in the square model input."""

    scale: float
    new_h: int
    new_w: int
    top: int
    left: int
    size: int


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    """Resize factor and padding that fit ``height x width`` into ``size x size``."""
    if height < 1 or width < 1 or size < 1:
        raise ValueError(f"invalid geometry {height}x{width} -> {size}")
    scale = size / max(height, width)
    new_h = max(1, min(size, round(height * scale)))
    new_w = max(1, min(size, round(width * scale)))
    return Letterbox(scale, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2, size)


def _looks_like_raster(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(8)
    return head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC)


def read_dataset(path: str | Path, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file, including legacy files without preamble or file meta header.

    Raises
    ------
    NotDicomError
        The file is not DICOM.
    TruncatedFileError
        The file ends before its declared content.
    ImageReadError
        The file cannot be opened or parsed.
    """
    path = Path(path)
    name = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(name, f"cannot open ({exc.strerror or exc})") from exc
    if size == 0:
        raise NotDicomError(name, "empty file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            except InvalidDicomError:
                # No 'DICM' preamble: maybe a legacy (ACR-NEMA style) raw data set.
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
                _check_forced(ds, name)
                _infer_transfer_syntax(ds)
        except (EOFError, OSError) as exc:
            raise TruncatedFileError(name, f"file ends unexpectedly ({exc})") from exc
        except NotDicomError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise NotDicomError(name, f"not a readable DICOM data set ({exc})") from exc
        # pydicom parses lazily for some values: touch the pixel element to surface truncation
        if not stop_before_pixels and "PixelData" in ds:
            _ = ds.PixelData
    for warning in caught:
        text = str(warning.message)
        if (
            "End of file" in text
            or "ended before" in text
            or "Expected" in text
            and "bytes" in text
        ):
            raise TruncatedFileError(name, f"file ends before its declared content ({text})")
    if not stop_before_pixels:
        _check_native_length(ds, name)
    ds.filename = name
    return ds


def _check_forced(ds: Dataset, name: str) -> None:
    """Decide whether a data set read with ``force=True`` is really DICOM."""
    tags = list(ds.keys())
    if not tags:
        raise NotDicomError(name, "no DICOM preamble and no data elements")
    groups = {int(tag) >> 16 for tag in tags}
    if not groups & {0x0008, 0x0010, 0x0020, 0x0028}:
        raise NotDicomError(name, "no DICOM preamble and no DICOM attributes")
    for elem in ds.iterall():  # force the parse of every element: garbage fails here
        _ = elem.value


def _infer_transfer_syntax(ds: Dataset) -> None:
    """Give a legacy data set (no file meta) the transfer syntax it was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = meta if meta is not None else FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta


def _check_native_length(ds: Dataset, name: str) -> None:
    """Native (uncompressed) pixel data shorter than the header promises means truncation."""
    if "PixelData" not in ds:
        return
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageReadError(name, f"incomplete image pixel module ({exc})") from exc
    expected = rows * cols * samples * frames * bits // 8
    actual = len(ds.PixelData)
    if actual < expected:
        raise TruncatedFileError(
            name, f"pixel data has {actual} bytes, the header declares {expected}"
        )


def _source_name(ds: Dataset) -> str:
    return str(getattr(ds, "filename", None) or ds.get("SOPInstanceUID", "<dataset>"))


def load_image(source: str | Path | Dataset) -> np.ndarray:
    """Decode ``source`` to a display-ready float32 ``H x W`` image in [0, 1].

    Parameters
    ----------
    source : str, Path or pydicom.Dataset
        A DICOM file (with or without file meta header), a dataset, or a PNG/JPEG file.

    Raises
    ------
    ImageReadError
        (or a subclass) naming the file and the cause.
    """
    if isinstance(source, Dataset):
        return _dicom_to_image(source, _source_name(source))
    path = Path(source)
    if not path.is_file():
        raise ImageReadError(str(path), "no such file")
    if path.suffix.lower() in RASTER_SUFFIXES or _looks_like_raster(path):
        return _load_raster(path)
    ds = read_dataset(path)
    return _dicom_to_image(ds, str(path))


def _load_raster(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float32)
                top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
                return np.clip(arr / top, 0.0, 1.0).astype(np.float32)
            gray = img.convert("L")
            return np.asarray(gray, dtype=np.float32) / np.float32(255.0)
    except UnidentifiedImageError as exc:
        raise NotDicomError(str(path), "neither DICOM nor a readable PNG/JPEG") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise TruncatedFileError(str(path), f"image data cannot be decoded ({exc})") from exc


def _decode_pixels(ds: Dataset, name: str) -> np.ndarray:
    if "PixelData" not in ds:
        raise UnsupportedImageError(name, "no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise UnsupportedImageError(name, "multi-frame images are not supported")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        label = syntax.name if syntax is not None else "unknown transfer syntax"
        raise PixelDecodeError(name, f"pixel data cannot be decoded ({label}: {exc})") from exc
    if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:
        # colour: luminance (secondary captures of chest films are sometimes RGB)
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return (arr.astype(np.float32) @ weights).astype(np.float32)
    if arr.ndim != 2:
        raise UnsupportedImageError(name, f"unsupported pixel array shape {arr.shape}")
    return arr


def _padding_mask(raw: np.ndarray, ds: Dataset) -> np.ndarray | None:
    if "PixelPaddingValue" not in ds:
        return None
    value = int(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        mask = raw == value
    else:
        low, high = sorted((value, int(limit)))
        mask = (raw >= low) & (raw <= high)
    return mask if mask.any() else None


def _modality_lut(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    out = raw.astype(np.float32, copy=True)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _first_number(value: Any) -> float:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _voi(values: np.ndarray, ds: Dataset, valid: np.ndarray | None) -> np.ndarray:
    """Map modality values to [0, 1] through the VOI transform (or a robust window)."""
    if "VOILUTSequence" in ds and "WindowCenter" not in ds:
        lut_item = ds.VOILUTSequence[0]
        descriptor = [int(v) for v in lut_item.LUTDescriptor]
        entries = descriptor[0] or 65536
        first = descriptor[1]
        bits = descriptor[2]
        lut = np.asarray(lut_item.LUTData, dtype=np.float32).reshape(-1)[:entries]
        index = np.clip(np.rint(values) - first, 0, len(lut) - 1).astype(np.int64)
        top = float(2**bits - 1) if bits > 0 else float(lut.max() or 1.0)
        return np.clip(lut[index] / top, 0.0, 1.0).astype(np.float32)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = _first_number(ds.WindowCenter)
        width = _first_number(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if width > 0 or (function == "LINEAR_EXACT" and width > 0):
            if function == "SIGMOID":
                sig = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
                return np.asarray(sig, dtype=np.float32)
            if function == "LINEAR_EXACT":
                low, span = center - width / 2.0, width
            else:  # LINEAR (PS3.3 C.11.2.1.2.1)
                if width < 1:
                    width = 1.0
                low, span = center - 0.5 - (width - 1) / 2.0, width - 1.0
            span = max(span, 1e-6)
            lin = (values - np.float32(low)) / np.float32(span)
            return np.clip(lin, 0.0, 1.0).astype(np.float32, copy=False)
        logger.debug("ignoring non-positive window width %s", width)
    # robust percentile window over a regular subsample of the valid pixels
    step = max(1, int(np.sqrt(values.size / 262144)))
    sample = values[::step, ::step]
    if valid is not None:
        sample = sample[valid[::step, ::step]]
    if sample.size == 0:
        return np.zeros_like(values, dtype=np.float32)
    low, high = np.percentile(sample, _PERCENTILES)
    if high <= low:
        high = low + 1.0
    robust = (values - np.float32(low)) / np.float32(high - low)
    return np.clip(robust, 0.0, 1.0).astype(np.float32, copy=False)


def _dicom_to_image(ds: Dataset, name: str) -> np.ndarray:
    raw = _decode_pixels(ds, name)
    pad = _padding_mask(raw, ds)
    values = _modality_lut(raw, ds)
    image = _voi(values, ds, None if pad is None else ~pad)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "MONOCHROME1":
        image = np.subtract(np.float32(1.0), image, out=image)
    if pad is not None:
        image[pad] = 0.0
    return np.ascontiguousarray(image, dtype=np.float32)


def check_eligibility(ds: Dataset) -> tuple[bool, str]:
    """Is this instance a frontal chest radiograph we can triage?

    Returns
    -------
    (bool, str)
        ``(True, "")`` or ``(False, reason)`` with a short reason a person can read, such as
        ``"lateral view"``, ``"body part HIP"``, ``"modality CT"`` or ``"multi-frame"``.
    """
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in ELIGIBLE_MODALITIES:
        return False, f"modality {modality or 'absent'}"
    if "PixelData" not in ds and "Rows" not in ds:
        return False, "no pixel data"
    frames = ds.get("NumberOfFrames", 1)
    try:
        if int(frames or 1) > 1:
            return False, "multi-frame"
    except (TypeError, ValueError):
        return False, f"invalid NumberOfFrames {frames!r}"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return False, "colour image"
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return False, f"body part {body_part}"
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        return False, "lateral view"
    if view and view not in FRONTAL_VIEWS:
        return False, f"view {view}"
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        return False, "invalid image size"
    if min(rows, cols) < 64:
        return False, f"image too small ({rows}x{cols})"
    return True, ""


def to_tensor(image: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """Letterbox ``image`` (float ``H x W`` in [0, 1]) into the checkpoint's normalised input.

    Returns
    -------
    torch.Tensor
        ``(3, S, S)`` float32 with ``S = spec.input_size``.
    """
    import torch
    import torch.nn.functional as F

    if image.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {image.shape}")
    height, width = image.shape
    box = letterbox_geometry(height, width, spec.input_size)
    src = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if (box.new_h, box.new_w) != (height, width):
        src = F.interpolate(
            src, size=(box.new_h, box.new_w), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    canvas = torch.zeros((1, spec.input_size, spec.input_size), dtype=torch.float32)
    canvas[:, box.top : box.top + box.new_h, box.left : box.left + box.new_w] = src[0]
    out = canvas.expand(3, -1, -1).clone()
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return out.sub_(mean).div_(std)


def unletterbox(square: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo :func:`to_tensor`'s geometry for a ``S x S`` map: crop the padding, resize to
    ``height x width`` (bilinear). Used to bring Grad-CAM maps back to the source image."""
    import torch
    import torch.nn.functional as F

    size = square.shape[0]
    if square.ndim != 2 or square.shape[1] != size:
        raise ValueError(f"expected a square 2-D map, got shape {square.shape}")
    box = letterbox_geometry(height, width, size)
    crop = square[box.top : box.top + box.new_h, box.left : box.left + box.new_w]
    src = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    out = F.interpolate(src, size=(height, width), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()
