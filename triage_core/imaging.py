"""From a DICOM file, a ``pydicom.Dataset`` or a PNG/JPEG to a display-ready image and a tensor.

The model learns from the NIH ChestX-ray14 PNGs: 8-bit exports of windowed DICOMs, resized to a
square with Lanczos (1024 px, then 256 px for the shared set). A DICOM is therefore rendered the
way those exports look before it meets the model (``PREPROCESSING_VERSION`` in
:mod:`triage_core.spec`):

1. decode (pydicom 3 with the pylibjpeg and pyjpegls plugins: JPEG baseline/extended/lossless,
   JPEG-LS, JPEG 2000, RLE, deflate, native);
2. pixel padding (``PixelPaddingValue`` / ``PixelPaddingRangeLimit``) is masked out;
3. Modality LUT: rescale slope/intercept or the Modality LUT Sequence;
4. VOI LUT: the first window (``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``) or the VOI LUT
   Sequence; without either, a robust window from the 0.5th to the 99.5th percentile of the
   non-padding pixels;
5. ``MONOCHROME1`` is inverted, so that bone is bright as a reader sees it;
6. intensity standardisation (:func:`standardise_intensities`): the windowed values are mapped,
   piecewise linearly, so that their percentiles land on the mean percentiles of the NIH
   exports (:data:`NIH_PERCENTILES`, :data:`NIH_LANDMARKS`; Nyul and Udupa's landmark method).
   A header window such as RG1's (centre 15000, width 30000 over 15-bit data) otherwise leaves
   the lungs mid-grey, an image the model never saw; padding becomes 0;
7. 8-bit quantisation, as in the exports.

PNG/JPEG files are read as they are (steps 1-7 happened when they were exported).
:func:`to_tensor` is shared by both paths and by training:

* an image larger than the exports (:data:`EXPORT_SIZE` on its long side) is first reduced with
  Lanczos to that size, as the exports were (the shared 256 px PNGs are left untouched);
* an image whose aspect ratio lies within that of the NIH originals (:data:`STRETCH_ASPECT`) is
  resized to the square, as NIH's 1024 x 1024 exports were; a more elongated one keeps its aspect
  ratio and is padded symmetrically with 0 (:func:`letterbox_geometry`);
* the last resize to the model's input size is antialiased bilinear, gray goes to three channels
  and the checkpoint's mean and std are applied.

``benchmarks/dicom_png_gap.py`` measures how far the shared chest DICOMs land from the PNG test
images, in pixel statistics and in probabilities.
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

#: Long side of the training exports (the shared NIH PNGs are 256 x 256): larger images are
#: first reduced to it with Lanczos, as the exports were.
EXPORT_SIZE = 256
#: Aspect ratios (long / short side) up to this are resized to the square, as NIH's exports
#: were (the NIH originals span 0.82-1.22 between the 1st and 99th percentile of
#: ``Data_Entry_2017.csv``); beyond it the image is letterboxed.
STRETCH_ASPECT = 1.25
#: Percentiles at which :func:`standardise_intensities` matches a DICOM to the NIH exports.
NIH_PERCENTILES: tuple[float, ...] = (
    0.5, 1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99, 99.5
)  # fmt: skip
#: Mean of each image's :data:`NIH_PERCENTILES` over the 584 shared 256 px NIH PNGs, intensity
#: in [0, 1] (the 20 full-size PNGs agree within 0.02). Label-free; recompute with
#: ``np.mean([np.percentile(img, NIH_PERCENTILES) for img in pngs], axis=0)``.
NIH_LANDMARKS: tuple[float, ...] = (
    0.0166, 0.0237, 0.0381, 0.0869, 0.1711, 0.2877, 0.3749, 0.4565, 0.5321,
    0.5989, 0.6613, 0.7262, 0.7943, 0.8275, 0.8519, 0.8659, 0.8771,
)  # fmt: skip


@dataclass(frozen=True)
class Letterbox:
    """How an ``height x width`` image sits in the square model input.

    ``new_h x new_w`` is the resized image, placed at ``(top, left)``; ``scale`` is the factor
    of the long side (the short side's is ``new_h / height`` or ``new_w / width`` when the image
    is stretched to the square).
    """

    scale: float
    new_h: int
    new_w: int
    top: int
    left: int
    size: int


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    """Resize factor and padding that fit ``height x width`` into ``size x size``.

    Near-square images (aspect ratio up to :data:`STRETCH_ASPECT`) fill the square, as NIH's
    exports did; others keep their aspect ratio and are centred with padding.
    """
    if height < 1 or width < 1 or size < 1:
        raise ValueError(f"invalid geometry {height}x{width} -> {size}")
    scale = size / max(height, width)
    if max(height, width) <= STRETCH_ASPECT * min(height, width):
        return Letterbox(scale, size, size, 0, 0, size)
    new_h = max(1, min(size, round(height * scale)))
    new_w = max(1, min(size, round(width * scale)))
    return Letterbox(scale, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2, size)


def _looks_like_raster(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(8)
    return head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC)


def is_raster(path: str | Path) -> bool:
    """Whether ``path`` is a PNG/JPEG rather than DICOM: by its suffix
    (:data:`RASTER_SUFFIXES`) or, without one, by its first bytes (``False`` when it cannot be
    opened: reading it as DICOM then reports why)."""
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return True
    try:
        return _looks_like_raster(path)
    except OSError:
        return False


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
        return load_raster(path)
    ds = read_dataset(path)
    return _dicom_to_image(ds, str(path))


def load_raster(path: str | Path) -> np.ndarray:
    """Decode a PNG/JPEG (an export: already windowed, see the module docstring) to a float32
    ``H x W`` image in [0, 1]; 16-bit grey is scaled by 65535, colour is converted to grey.

    Raises
    ------
    ImageReadError
        (or a subclass) naming the file and the cause.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(str(path), "no such file")
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


def window_dicom(ds: Dataset, name: str | None = None) -> np.ndarray:
    """Steps 1-5 of the module docstring: decoded, LUT-mapped, windowed and ``MONOCHROME1``
    inverted pixels in [0, 1] at the source resolution, before standardisation.

    Returns
    -------
    numpy.ndarray
        float32 ``H x W``; padding pixels are 0.
    """
    return _window_dicom(ds, name or _source_name(ds))[0]


def _window_dicom(ds: Dataset, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    raw = _decode_pixels(ds, name)
    pad = _padding_mask(raw, ds)
    values = _modality_lut(raw, ds)
    image = _voi(values, ds, None if pad is None else ~pad)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "MONOCHROME1":
        image = np.subtract(np.float32(1.0), image, out=image)
    if pad is not None:
        image[pad] = 0.0
    return np.ascontiguousarray(image, dtype=np.float32), pad


def _dicom_to_image(ds: Dataset, name: str) -> np.ndarray:
    image, pad = _window_dicom(ds, name)
    image = standardise_intensities(image, None if pad is None else ~pad)
    if pad is not None:
        image[pad] = 0.0
    return quantise_8bit(image)


def standardise_intensities(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Map ``image`` (in [0, 1]) so that its percentiles match the NIH exports'.

    Piecewise-linear histogram standardisation (Nyul and Udupa, 1999; Nyul, Udupa and Zhang,
    2000): the image's :data:`NIH_PERCENTILES` (over the ``valid`` pixels) are sent to
    :data:`NIH_LANDMARKS` and values in between are interpolated linearly (values outside the
    outer landmarks are clamped to them). The mapping is monotone, so the header window still
    decides what is saturated; only the grey levels move to where the training images have them.
    numpy has no such function and the scikit-image / intensity-normalization versions need a
    training pass of their own, hence these few lines.
    """
    sample = image if valid is None else image[valid]
    step = max(1, sample.size // 1_000_000)
    sample = sample.reshape(-1)[::step]
    if sample.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    source = np.percentile(sample, NIH_PERCENTILES)
    # strictly increasing x for np.interp (flat stretches: saturated or constant images)
    source = np.maximum.accumulate(source + np.arange(len(source)) * 1e-6)
    out = np.interp(image, source, np.asarray(NIH_LANDMARKS, dtype=np.float64))
    return out.astype(np.float32)


def quantise_8bit(image: np.ndarray) -> np.ndarray:
    """``image`` in [0, 1] rounded to 256 grey levels (as an 8-bit PNG stores it), float32."""
    out = np.rint(np.clip(image, 0.0, 1.0) * np.float32(255.0)) / np.float32(255.0)
    return np.ascontiguousarray(out, dtype=np.float32)


def export_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lanczos resize of a [0, 1] image to ``height x width``, rounded to 8 bits (Pillow,
    the library the NIH exports were resized with)."""
    from PIL import Image

    src = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    small = src.resize((width, height), Image.Resampling.LANCZOS)
    return quantise_8bit(np.asarray(small, dtype=np.float32))


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


def to_array(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Letterbox ``image`` (float ``H x W`` in [0, 1]) into the checkpoint's normalised input.

    Images larger than :data:`EXPORT_SIZE` are first reduced to it with Lanczos; then the
    (stretched or letterboxed, see :func:`letterbox_geometry`) image is resized to the input
    size with antialiased bilinear interpolation (:func:`triage_core.resample.resize_antialiased`,
    the weights of ``torch.nn.functional.interpolate(..., antialias=True)``). numpy only: the
    serving runtime has no torch, and training uses this very function (:func:`to_tensor`).

    Returns
    -------
    numpy.ndarray
        ``(3, S, S)`` float32 with ``S = spec.input_size``.
    """
    from triage_core.resample import resize_antialiased

    if image.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {image.shape}")
    height, width = image.shape
    if max(height, width) > EXPORT_SIZE:  # reduce as the training exports were
        export = letterbox_geometry(height, width, EXPORT_SIZE)
        image = export_resize(image, export.new_h, export.new_w)
        height, width = image.shape
    box = letterbox_geometry(height, width, spec.input_size)
    src = np.ascontiguousarray(image, dtype=np.float32)
    if (box.new_h, box.new_w) != (height, width):
        src = np.clip(resize_antialiased(src, box.new_h, box.new_w), 0.0, 1.0)
    size = spec.input_size
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[box.top : box.top + box.new_h, box.left : box.left + box.new_w] = src
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    out: np.ndarray = (canvas[None] - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)


def to_tensor(image: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """:func:`to_array` as a ``(3, S, S)`` float32 ``torch.Tensor`` (training, torch runtime)."""
    import torch

    return torch.from_numpy(to_array(image, spec))


def unletterbox(square: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo :func:`to_array`'s geometry for a ``S x S`` map: crop the padding, resize to
    ``height x width`` (bilinear). Used to bring Grad-CAM maps back to the source image."""
    from triage_core.resample import resize_bilinear

    size = square.shape[0]
    if square.ndim != 2 or square.shape[1] != size:
        raise ValueError(f"expected a square 2-D map, got shape {square.shape}")
    box = letterbox_geometry(height, width, size)
    crop = square[box.top : box.top + box.new_h, box.left : box.left + box.new_w]
    return resize_bilinear(crop, height, width)
