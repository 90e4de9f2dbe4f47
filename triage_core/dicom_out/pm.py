"""The Parametric Map: :func:`build_pm`, the Grad-CAM heat map as numbers (IHE AI Results).

The Secondary Capture (:mod:`.sc`) shows the map burned into a picture; the Parametric Map
carries the map itself, so that a viewer can overlay it, colour it and read its values:

* **Pixel data**: the class activation map of one finding over the whole source image (the
  letterbox of ``triage_core.imaging`` already removed, ``triage_core.cam.to_source``), in
  [0, 1] as a fraction of its peak, stored as 16-bit unsigned integers ``round(65535 * value)``
  (so the stored precision is 1/65535). Real World Value Mapping: first/last value mapped 0 and
  65535, slope 1/65535, intercept 0, unit UCUM ``1`` ("no units"), LUT label ``GRADCAM``,
  quantity (private code ``GRADCAM``) "Class activation (Grad-CAM)". A VOI window covers the
  whole range.
* **References**: the source image in the Derivation Image Sequence of the frame (highdicom,
  purpose DCM 121322) and in Referenced Image / Source Image Sequence; same study, new series
  (Series Number 9903 by default), Modality ``OT`` (the Parametric Map IOD's).
* **Geometry**. The Parametric Map IOD requires a Frame of Reference, a plane position, a plane
  orientation and pixel spacing; a projection radiograph (CR, DX) usually has no Frame of
  Reference (it is not placed in the patient's 3-D space). Where the source lacks them, the map
  gets a Frame of Reference of its own: a UID derived from the source's SOP Instance UID
  (the same for every map of that image), whose plane *is* the source image's pixel grid. The
  centre of the source's top left pixel is the origin; the orientation follows the source's
  Patient Orientation (``L\\F``, the usual PA chest: rows run to the patient's left, columns to
  the feet, i.e. ``1\\0\\0\\0\\0\\-1``), ``1\\0\\0\\0\\1\\0`` when it has none; the spacing is the
  source's Pixel Spacing, else its Imager Pixel Spacing, else 1 mm, scaled by the ratio of the
  two pixel grids when the map is smaller than the image. So the map lines up with the image
  pixel for pixel; the 3-D values mean nothing beyond that.
* **Provenance**: the algorithm in Contributing Equipment (IHE AIR "Processing Algorithm", with
  the Device UID), Content Label ``GRADCAM``, Content Description naming the finding and its
  probability, Content Qualification ``RESEARCH``, Series Description "cxr-triage Grad-CAM map
  (NOT FOR DIAGNOSTIC USE)", Body Part Examined copied from the source (``CHEST`` when absent).

highdicom 0.28.2 builds a Parametric Map of a source without Frame of Reference with a
Dimension Index on Frame Label that no frame carries (its constructor then fails, and the IOD
needs a Frame of Reference anyway), which is why the geometry above is given to it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from triage_core.dicom_out.common import (
    _CS_RE,
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    PM_SERIES_DESCRIPTION,
    PRIVATE_SCHEME,
    UNIT_ONE,
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

#: Largest stored value: the map's 1.0.
PM_MAX_STORED = 65535
#: LUT label of the Real World Value Mapping (and the Content Label).
PM_LABEL = "GRADCAM"
#: What the real-world values are.
CAM_QUANTITY = Code("GRADCAM", PRIVATE_SCHEME, "Class activation (Grad-CAM)")
_DIRECTIONS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}
_NOMINAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _check_heatmap(heatmap: object) -> np.ndarray:
    if not isinstance(heatmap, np.ndarray):
        raise DicomOutputError(f"heatmap: expected a numpy array, got {type(heatmap).__name__}")
    if heatmap.dtype.kind != "f":
        raise DicomOutputError(f"heatmap: expected floating-point values, got {heatmap.dtype}")
    if heatmap.ndim != 2:
        raise DicomOutputError(f"heatmap: expected a 2-D array, got shape {heatmap.shape}")
    rows, cols = heatmap.shape
    if not (8 <= rows <= 65535 and 8 <= cols <= 65535):
        raise DicomOutputError(f"heatmap: {rows}x{cols} values, each side must lie in [8, 65535]")
    if not np.isfinite(heatmap).all():
        raise DicomOutputError("heatmap: holds non-finite values")
    low, high = float(heatmap.min()), float(heatmap.max())
    if low < 0.0 or high > 1.0:
        raise DicomOutputError(f"heatmap: values must lie in [0, 1], found [{low:.4g}, {high:.4g}]")
    return heatmap


def stored_values(heatmap: np.ndarray) -> np.ndarray:
    """The 16-bit stored values of a [0, 1] map (``round(65535 * value)``)."""
    return np.rint(np.asarray(heatmap, dtype=np.float64) * PM_MAX_STORED).astype(np.uint16)


def frame_of_reference_uid(source_uid: str) -> str:
    """The Frame of Reference UID given to the maps of a source image that has none."""
    key = f"{MANUFACTURER}\x1fframe of reference\x1f{source_uid}"
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, key).int}"


def _spacing(source: Dataset) -> tuple[float, float]:
    """(row, column) spacing of the source in mm: Pixel Spacing, Imager Pixel Spacing, 1."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        try:
            row, col = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0:
            return row, col
    return 1.0, 1.0


def _orientation(source: Dataset) -> tuple[float, ...]:
    """Direction cosines from Patient Orientation (single letters only), else nominal."""
    value = source.get("PatientOrientation")
    values = [str(v) for v in value] if isinstance(value, list | tuple) else []
    if not values and value is not None and not isinstance(value, str):
        try:
            values = [str(v) for v in value]
        except TypeError:
            values = []
    if len(values) == 2 and all(v in _DIRECTIONS for v in values) and values[0] != values[1]:
        row, col = _DIRECTIONS[values[0]], _DIRECTIONS[values[1]]
        if abs(float(np.dot(row, col))) < 1e-9:
            return row + col
    return _NOMINAL_ORIENTATION


def _geometry(source: Dataset, reference: Dataset, shape: tuple[int, int]) -> dict[str, Any]:
    """Frame of reference on the source (one of its own when it has none) and the map's plane
    position, orientation and spacing, as highdicom arguments."""
    import highdicom as hd

    rows, cols = int(source.Rows), int(source.Columns)
    has_geometry = all(
        k in source
        for k in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient")
    ) and _is_uid(str(source.get("FrameOfReferenceUID", "")))
    if has_geometry:
        try:
            origin = tuple(float(v) for v in source.ImagePositionPatient)
            orientation = tuple(float(v) for v in source.ImageOrientationPatient)
        except (TypeError, ValueError):
            has_geometry = False
        else:
            has_geometry = len(origin) == 3 and len(orientation) == 6
    if not has_geometry:
        origin = (0.0, 0.0, 0.0)
        orientation = _orientation(source)
        reference.FrameOfReferenceUID = frame_of_reference_uid(str(source.SOPInstanceUID))
        reference.PositionReferenceIndicator = ""
    row_spacing, col_spacing = _spacing(source)
    reference.ImagePositionPatient = list(origin)
    reference.ImageOrientationPatient = list(orientation)
    reference.PixelSpacing = [row_spacing, col_spacing]
    if "SliceThickness" not in reference:  # read by highdicom; ours (below) has none
        reference.SliceThickness = 1.0
    # the map's grid over the same extent: its pixels are (rows / h) x (cols / w) source pixels
    scale_row, scale_col = rows / shape[0], cols / shape[1]
    map_row_spacing, map_col_spacing = row_spacing * scale_row, col_spacing * scale_col
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    # centre of the map's first pixel, from the centre of the source's first pixel
    offset = (
        row_dir * (scale_col - 1) / 2 * col_spacing + col_dir * (scale_row - 1) / 2 * row_spacing
    )
    position = [float(v) for v in np.array(origin) + offset]
    return {
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=(map_row_spacing, map_col_spacing), slice_thickness=None
        ),
        "plane_orientation": hd.PlaneOrientationSequence("PATIENT", orientation),
        "plane_positions": [hd.PlanePositionSequence("PATIENT", position)],
    }


def build_pm(
    heatmap: np.ndarray,
    source: Dataset,
    finding: Finding,
    spec: ModelSpec,
    *,
    series_number: int = 9903,
    instance_number: int = 1,
    device_uid: str | None = None,
) -> Dataset:
    """Build the Parametric Map that carries a Grad-CAM heat map for one finding.

    Parameters
    ----------
    heatmap : numpy.ndarray
        float ``h x w`` in [0, 1] over the whole source image (letterbox removed), at the
        source's resolution or scaled down (aspect ratio kept): the geometry is scaled to match.
    source : pydicom.Dataset
        The image the map was computed on (header-only is enough).
    finding : Finding
        The finding the map explains. When ``finding.source_uid`` is a UID it must be the
        source's SOP Instance UID.
    spec : ModelSpec
        The model (Contributing Equipment, Content Description).
    series_number, instance_number : int
        Series Number and Instance Number of the new map.
    device_uid : str, optional
        Device UID of the algorithm; default :func:`~.common.default_device_uid`.

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.pm.ParametricMap`` (Explicit VR Little Endian) with file meta.

    Raises
    ------
    DicomOutputError
        When an input is invalid; the message names the value.
    """
    import highdicom as hd

    values = _check_heatmap(heatmap)
    if not isinstance(spec, ModelSpec):
        raise DicomOutputError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    if not isinstance(source, Dataset):
        raise DicomOutputError(f"source: expected a pydicom Dataset, got {type(source).__name__}")
    _require_attrs(
        source, "source", ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns")
    )
    checked = _check_finding(finding, spec, "finding")
    if _is_uid(checked.source_uid) and checked.source_uid != source.SOPInstanceUID:
        raise DicomOutputError(
            f"finding {checked.name} comes from image {checked.source_uid}, but the map's "
            f"source is {source.SOPInstanceUID}"
        )
    _check_number("series_number", series_number)
    _check_number("instance_number", instance_number)
    uid = _device_uid(spec, device_uid)
    reference = _sanitized_reference(source, "source")
    if "SeriesInstanceUID" not in reference:
        raise DicomOutputError("source: required attribute SeriesInstanceUID is missing")
    try:
        geometry = _geometry(source, reference, values.shape)
        mapping = hd.pm.RealWorldValueMapping(
            lut_label=PM_LABEL,
            lut_explanation=_text(f"Grad-CAM of {checked.name}, fraction of its peak", 64),
            unit=UNIT_ONE,
            value_range=(0, PM_MAX_STORED),
            slope=1.0 / PM_MAX_STORED,
            intercept=0.0,
            quantity_definition=CAM_QUANTITY,
        )
        body_part = str(reference.get("BodyPartExamined", "") or "")
        laterality = reference.get("Laterality")
        pm = hd.pm.ParametricMap(
            source_images=[reference],
            pixel_array=stored_values(values),
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=_model_name(spec),
            software_versions=_software_versions(spec),  # type: ignore[arg-type]
            device_serial_number=uid[-16:],
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[
                hd.VOILUTTransformation(
                    window_center=PM_MAX_STORED / 2, window_width=PM_MAX_STORED + 1
                )
            ],
            content_label=PM_LABEL,
            content_description=_text(
                f"Grad-CAM of {checked.name} (p={checked.probability:.3f}), "
                f"{NOT_FOR_DIAGNOSTIC_USE}",
                64,
            ),
            contributing_equipment=[_algorithm_equipment(spec, uid)],
            series_description=PM_SERIES_DESCRIPTION,
            coding_schemes=_coding_schemes(),
            **geometry,
        )
        pm.BodyPartExamined = body_part if _CS_RE.match(body_part) else "CHEST"
        if laterality in ("R", "L"):
            pm.Laterality = laterality
        elif "Laterality" in reference:  # Type 2C: the source says it applies, value unknown
            pm.Laterality = ""
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DicomOutputError(
            f"source {source.SOPInstanceUID}: Parametric Map could not be built: {exc}"
        ) from exc
    logger.debug(
        "built PM %s for %s (%s, %dx%d)",
        pm.SOPInstanceUID,
        source.SOPInstanceUID,
        checked.name,
        values.shape[0],
        values.shape[1],
    )
    return pm


def heatmap_from_pm(ds: Dataset) -> np.ndarray:
    """The [0, 1] map of a Parametric Map made by :func:`build_pm` (its mapping applied).

    Raises
    ------
    DicomOutputError
        When ``ds`` is not such a map.
    """
    import highdicom as hd

    try:
        pm = hd.pm.ParametricMap.from_dataset(ds, copy=True)
        frame = pm.get_frame(1, apply_real_world_transform=True)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise DicomOutputError(
            f"dataset {ds.get('SOPInstanceUID', '?')} is not a Parametric Map we can read: {exc}"
        ) from exc
    return np.asarray(frame, dtype=np.float64)
