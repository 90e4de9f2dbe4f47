"""Image regions from class activation maps: where on the source image a finding was seen.

The rule (:func:`cam_region`), applied to the map of one finding over the whole source image
(``triage_core.cam.to_source``: the letterbox padding of ``triage_core.imaging.to_tensor``
cropped off, then resized to the image's aspect ratio, values in [0, 1] with the peak at 1):

1. keep the pixels whose value is at least :data:`REGION_FRACTION` (one half) of the map's peak;
2. of those, take the 8-connected component that holds the peak (the first peak pixel in
   row-major order when several pixels share it);
3. its bounding box, in **source-image pixel coordinates**: the map's ``h x w`` grid is scaled
   to the source's ``Rows x Columns`` (``x * Columns / w``, ``y * Rows / h``), in the convention
   of PS3.3 C.18.6.1.2 (the top left corner of the top left pixel is ``0,0``, the bottom right
   corner of the bottom right pixel is ``Columns,Rows``): a box over map pixels ``c0..c1`` and
   ``r0..r1`` runs from ``(c0, r0)`` to ``(c1 + 1, r1 + 1)`` before scaling.

The SR (:func:`~.sr.build_sr`) writes the box as a closed SCOORD ``POLYLINE`` of five
``(column, row)`` points (top left, top right, bottom right, bottom left, top left) on the
source image, in a TID 1410 group with Geometric Purpose "Bounded by". A map that is zero
everywhere has no region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from triage_core.errors import DicomOutputError

#: Pixels at or above this fraction of the map's peak form the region.
REGION_FRACTION = 0.5


@dataclass(frozen=True)
class CamRegion:
    """A finding's region on its source image (source pixel coordinates, PS3.3 C.18.6.1.2).

    Attributes
    ----------
    source_uid : str
        SOP Instance UID of the image the region lies on.
    left, top, right, bottom : float
        The box: ``0 <= left < right <= Columns``, ``0 <= top < bottom <= Rows``.
    """

    source_uid: str
    left: float
    top: float
    right: float
    bottom: float

    def __post_init__(self) -> None:
        values = (self.left, self.top, self.right, self.bottom)
        if not all(isinstance(v, int | float) and np.isfinite(v) for v in values):
            raise DicomOutputError(f"region: coordinates must be finite numbers, got {values}")
        if not (0 <= self.left < self.right and 0 <= self.top < self.bottom):
            raise DicomOutputError(
                f"region: expected 0 <= left < right and 0 <= top < bottom, got {values}"
            )

    def polyline(self) -> np.ndarray:
        """The closed five-point ``(column, row)`` outline of the box."""
        return np.array(
            [
                [self.left, self.top],
                [self.right, self.top],
                [self.right, self.bottom],
                [self.left, self.bottom],
                [self.left, self.top],
            ],
            dtype=np.float64,
        )


def cam_region(
    heatmap: np.ndarray,
    rows: int,
    columns: int,
    source_uid: str,
    fraction: float = REGION_FRACTION,
) -> CamRegion | None:
    """The region of a class activation map on its source image (rule: module docstring).

    Parameters
    ----------
    heatmap : numpy.ndarray
        float ``h x w`` map over the whole source image (letterbox removed), any resolution.
    rows, columns : int
        The source image's Rows and Columns.
    source_uid : str
        The source's SOP Instance UID.
    fraction : float
        Threshold as a fraction of the peak, in (0, 1].

    Returns
    -------
    CamRegion or None
        ``None`` when the map is zero everywhere.

    Raises
    ------
    DicomOutputError
        Bad map, image size or fraction.
    """
    import cv2

    if not isinstance(heatmap, np.ndarray) or heatmap.ndim != 2 or heatmap.size == 0:
        raise DicomOutputError("heatmap: expected a non-empty 2-D numpy array")
    if not np.isfinite(heatmap).all():
        raise DicomOutputError("heatmap: holds non-finite values")
    for name, value in (("rows", rows), ("columns", columns)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise DicomOutputError(f"{name}: expected an integer in [1, 65535], got {value!r}")
    if not 0.0 < fraction <= 1.0:
        raise DicomOutputError(f"fraction: expected a value in (0, 1], got {fraction!r}")
    peak = float(heatmap.max())
    if peak <= 0.0:
        return None
    mask = (heatmap >= fraction * peak).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    peak_row, peak_col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    component = labels == labels[peak_row, peak_col]
    ys = np.flatnonzero(component.any(axis=1))
    xs = np.flatnonzero(component.any(axis=0))
    h, w = heatmap.shape
    return CamRegion(
        source_uid=source_uid,
        left=float(xs[0]) * columns / w,
        top=float(ys[0]) * rows / h,
        right=float(xs[-1] + 1) * columns / w,
        bottom=float(ys[-1] + 1) * rows / h,
    )
