"""The Secondary Capture: :func:`build_sc`, the Grad-CAM overlay with a burned-in caption.

See the package docstring for the image's header.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from triage_core.dicom_out.common import (
    _CS_RE,
    _MIN_CAPTION_SIDE,
    _ORIENTATION_RE,
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    RESEARCH_STATEMENT,
    SC_SERIES_DESCRIPTION,
    SOURCE_IMAGE_PURPOSE,
    _algorithm_equipment,
    _check_finding,
    _check_number,
    _coding_schemes,
    _device_uid,
    _is_uid,
    _model_name,
    _require_attrs,
    _sanitized_reference,
    _software_versions,
    _text,
)
from triage_core.errors import DicomOutputError
from triage_core.spec import Finding, ModelSpec

logger = logging.getLogger(__name__)


def _caption(finding: Finding) -> tuple[str, ...]:
    """Captions from the most to the least informative; the first that fits is burned in."""
    state = "present" if finding.present else "absent"
    return (
        f"{finding.name} p={finding.probability:.2f} ({state}, threshold "
        f"{finding.threshold:.2f}) | Grad-CAM | {NOT_FOR_DIAGNOSTIC_USE}",
        f"{finding.name} p={finding.probability:.2f} | {NOT_FOR_DIAGNOSTIC_USE}",
        f"{finding.name} p={finding.probability:.2f}",
    )


def burn_in_caption(image: np.ndarray, captions: Sequence[str]) -> tuple[np.ndarray, bool]:
    """Write the first caption that fits onto a black band at the top of an RGB image.

    Parameters
    ----------
    image : numpy.ndarray
        H x W x 3 uint8 RGB image (not modified).
    captions : sequence of str
        Candidate captions, longest first.

    Returns
    -------
    tuple of (numpy.ndarray, bool)
        The captioned copy, and whether a caption was burned in (images narrower or lower than
        64 pixels are returned unchanged).
    """
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    if height < _MIN_CAPTION_SIDE or width < _MIN_CAPTION_SIDE:
        return image.copy(), False
    band = max(12, min(height // 20, 64))
    margin = max(2, band // 6)
    # Only a strip at the top goes through Pillow (band plus room for descenders), not the
    # whole image: one copy of the image, and a few rows converted back and forth.
    strip_rows = min(height, 2 * band)
    strip = Image.fromarray(np.ascontiguousarray(image[:strip_rows]), mode="RGB")
    draw = ImageDraw.Draw(strip)
    for text in captions:
        size = band - 2 * margin
        while size >= 8:
            font = _font(size)
            if draw.textlength(text, font=font) <= width - 2 * margin:
                draw.rectangle((0, 0, width - 1, band - 1), fill=(0, 0, 0))
                draw.text((margin, margin), text, fill=(255, 255, 255), font=font)
                out = image.copy()
                out[:strip_rows] = np.asarray(strip, dtype=np.uint8)
                return out, True
            size -= 1
    return image.copy(), False


@functools.lru_cache(maxsize=64)
def _font(size: int) -> Any:
    """Pillow's default (FreeType) font at ``size`` pixels, loaded once per size."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _check_overlay(overlay: object) -> np.ndarray:
    if not isinstance(overlay, np.ndarray):
        raise DicomOutputError(f"overlay: expected a numpy array, got {type(overlay).__name__}")
    if overlay.dtype != np.uint8:
        raise DicomOutputError(f"overlay: expected dtype uint8 (RGB), got {overlay.dtype}")
    if overlay.ndim != 3 or overlay.shape[2] != 3:
        raise DicomOutputError(f"overlay: expected shape (H, W, 3), got {overlay.shape}")
    rows, cols = overlay.shape[:2]
    if not (8 <= rows <= 65535 and 8 <= cols <= 65535):
        raise DicomOutputError(f"overlay: {rows}x{cols} pixels, each side must lie in [8, 65535]")
    return np.ascontiguousarray(overlay)


def _orientation(source: Dataset) -> list[str] | None:
    value = source.get("PatientOrientation")
    if value is None or value == "":
        return None
    values = [
        str(v)
        for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])
    ]
    if len(values) == 2 and all(_ORIENTATION_RE.match(v) for v in values):
        return values
    return None


def build_sc(
    overlay: np.ndarray,
    source: Dataset,
    finding: Finding,
    spec: ModelSpec,
    *,
    series_number: int = 9902,
    instance_number: int = 1,
    device_uid: str | None = None,
) -> Dataset:
    """Build the RGB Secondary Capture that shows a Grad-CAM overlay for one finding.

    Parameters
    ----------
    overlay : numpy.ndarray
        H x W x 3 uint8 RGB overlay, normally at the source image's resolution.
    source : pydicom.Dataset
        The image the map was computed on (header-only is enough). Patient and study attributes
        are copied from it and it is referenced in Source Image Sequence.
    finding : Finding
        The finding the map explains; its name and probability go into the caption. When
        ``finding.source_uid`` is a UID it must be the source's SOP Instance UID.
    spec : ModelSpec
        The model (name and version go into Derivation Description and Contributing Equipment).
    series_number, instance_number : int
        Series Number and Instance Number of the new image.
    device_uid : str, optional
        Device UID of the algorithm in Contributing Equipment; default
        :func:`~.common.default_device_uid`.

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.sc.SCImage`` (Explicit VR Little Endian) with file meta.

    Raises
    ------
    DicomOutputError
        When an input is invalid; the message names the value.
    """
    pixels = _check_sc_inputs(overlay, source, finding, spec, series_number, instance_number)
    uid = _device_uid(spec, device_uid)
    captions = _caption(finding)
    captioned, burned = burn_in_caption(pixels, captions)
    reference = _sanitized_reference(source, "source")
    sc = _sc_image(source, reference, captioned, spec, uid, series_number, instance_number)
    _describe_sc(sc, reference, finding, spec, captions, burned)
    _reference_source(sc, reference, source)
    logger.debug(
        "built SC %s for %s (%s, caption burned in: %s)",
        sc.SOPInstanceUID,
        source.SOPInstanceUID,
        finding.name,
        burned,
    )
    return sc


def _check_sc_inputs(
    overlay: object,
    source: object,
    finding: object,
    spec: object,
    series_number: object,
    instance_number: object,
) -> np.ndarray:
    """:func:`build_sc`'s argument checks; returns the overlay as a uint8 array."""
    pixels = _check_overlay(overlay)
    if not isinstance(spec, ModelSpec):
        raise DicomOutputError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    if not isinstance(source, Dataset):
        raise DicomOutputError(f"source: expected a pydicom Dataset, got {type(source).__name__}")
    _require_attrs(source, "source", ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"))
    checked = _check_finding(finding, spec, "finding")
    if _is_uid(checked.source_uid) and checked.source_uid != source.SOPInstanceUID:
        raise DicomOutputError(
            f"finding {checked.name} comes from image {checked.source_uid}, but the overlay's "
            f"source is {source.SOPInstanceUID}"
        )
    _check_number("series_number", series_number)
    _check_number("instance_number", instance_number)
    return pixels


def _sc_image(
    source: Dataset,
    reference: Dataset,
    pixels: np.ndarray,
    spec: ModelSpec,
    device_uid: str,
    series_number: int,
    instance_number: int,
) -> Dataset:
    """The highdicom ``SCImage`` (new series, same study) around the captioned pixels."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    laterality = reference.get("Laterality")
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=reference,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            # Placeholder for highdicom's check; replaced by the source's value or empty.
            patient_orientation=("L", "F"),
            laterality=laterality if laterality in ("R", "L") else None,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[_algorithm_equipment(spec, device_uid)],
            series_description=SC_SERIES_DESCRIPTION,
            manufacturer_model_name=_model_name(spec),
            software_versions=_software_versions(spec),
            coding_schemes=_coding_schemes(),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise DicomOutputError(
            f"source {source.SOPInstanceUID}: Secondary Capture could not be built: {exc}"
        ) from exc
    # Type 2: the source's orientation when it is valid, otherwise present but empty.
    orientation = _orientation(source)
    sc["PatientOrientation"].value = orientation if orientation is not None else ""
    return sc


def _describe_sc(
    sc: Dataset,
    reference: Dataset,
    finding: Finding,
    spec: ModelSpec,
    captions: Sequence[str],
    burned: bool,
) -> None:
    """Body part, burned-in annotation flag, caption and derivation description."""
    body_part = str(reference.get("BodyPartExamined", "") or "")
    sc.BodyPartExamined = body_part if _CS_RE.match(body_part) else "CHEST"
    sc.BurnedInAnnotation = (
        "YES" if burned or reference.get("BurnedInAnnotation") == "YES" else "NO"
    )
    sc.ImageComments = _text(captions[0], 10240)
    sc.DerivationDescription = _text(
        f"Grad-CAM heat map for {finding.name} (probability {finding.probability:.3f}, "
        f"threshold {finding.threshold:.2f}) by {spec.display_name} ({spec.arch}), blended "
        f"over the source image; {RESEARCH_STATEMENT}",
        1024,
    )


def _reference_source(sc: Dataset, reference: Dataset, source: Dataset) -> None:
    """Source Image Sequence, and the lossy-compression flag inherited from the source."""
    import highdicom as hd

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_IMAGE_PURPOSE)]
    sc.SourceImageSequence = [item]
    if reference.get("LossyImageCompression") == "01":
        # Once lossy, always lossy (PS3.3 C.7.6.1.1.5): derived images keep the flag.
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in reference:
                sc[keyword] = reference[keyword]
