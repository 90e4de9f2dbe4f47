"""Pointing game: does the Grad-CAM maximum fall inside the radiologists' box?

NIH ChestX-ray14 ships ``BBox_List_2017.csv``: about a thousand boxes drawn by radiologists on
the 1024 x 1024 exports (``x, y, w, h`` in those pixels; the class is spelled ``Infiltrate``
there, ``Infiltration`` in the labels). For every box of a class the model predicts, on an image
we have, the map of that class is computed (``triage_core.cam.CamExplainer.explain``, at the
image's resolution); a *hit* is a maximum inside the box, widened by ``tolerance`` pixels of the
1024 px frame on each side (15 px, as in Zhang et al., "Top-down neural attention by excitation
backprop", 2016). The baseline points at the image centre every time: a map that does not beat it
has learnt nothing about where the finding is.

With few boxed images (a handful among the shared ones) the rates are anecdotes, not estimates:
the item list is reported with them.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data import DatasetError

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)

#: Side of the NIH exports the boxes were drawn on.
NIH_SIDE = 1024
#: Box labels spelled otherwise in the label file.
BOX_CLASS_NAMES: dict[str, str] = {"Infiltrate": "Infiltration"}
DEFAULT_TOLERANCE = 15.0


@dataclass(frozen=True)
class Box:
    """One radiologist box, in the 1024 px frame of the NIH export."""

    image_index: str
    label: str  # spelled as in the label file (``Infiltration``)
    x: float
    y: float
    w: float
    h: float

    def contains(self, x: float, y: float, tolerance: float = 0.0) -> bool:
        return (
            self.x - tolerance <= x <= self.x + self.w + tolerance
            and self.y - tolerance <= y <= self.y + self.h + tolerance
        )


def read_boxes(path: str | Path) -> list[Box]:
    """Read ``BBox_List_2017.csv`` (header ``Image Index,Finding Label,Bbox [x,y,w,h],...``).

    Raises
    ------
    DatasetError
        Unreadable file or a row without four finite numbers.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise DatasetError(f"box file {path}: {exc.strerror or exc}") from exc
    if not rows or not rows[0] or rows[0][0] != "Image Index":
        raise DatasetError(f"box file {path}: expected an 'Image Index' header")
    boxes = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not row[0]:
            continue
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"box file {path}, line {number}: bad box {row[2:6]}") from exc
        if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
            raise DatasetError(f"box file {path}, line {number}: bad box {row[2:6]}")
        label = BOX_CLASS_NAMES.get(row[1].strip(), row[1].strip())
        boxes.append(Box(row[0].strip(), label, x, y, w, h))
    return boxes


def boxes_by_image(boxes: Sequence[Box], class_names: Sequence[str]) -> dict[str, list[Box]]:
    """The boxes of the model's classes, by image name."""
    out: dict[str, list[Box]] = {}
    for box in boxes:
        if box.label in class_names:
            out.setdefault(box.image_index, []).append(box)
    return out


def peak_in_nih_frame(heatmap: np.ndarray) -> tuple[float, float] | None:
    """``(x, y)`` of the map's maximum (pixel centre), in the 1024 px frame of the export;
    ``None`` for an empty map (Grad-CAM is 0 everywhere: it points nowhere, a miss).

    The shared images are square exports resized from 1024 px, so one factor per axis maps them
    back; ties go to the first maximum in row-major order.
    """
    if not float(np.max(heatmap)) > 0.0:
        return None
    rows, cols = heatmap.shape
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return float((col + 0.5) * NIH_SIDE / cols), float((row + 0.5) * NIH_SIDE / rows)


def pointing_game(
    model: torch.nn.Module,
    spec: ModelSpec,
    boxes: Sequence[Box],
    images: Mapping[str, Path],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Pointing-game hit rate of the Grad-CAM maximum and of the image centre.

    Parameters
    ----------
    model, spec : the checkpoint.
    boxes : the boxes (:func:`read_boxes`); those of other classes are ignored.
    images : image name -> file, for the images we have (``training.data.index_images``).
    tolerance : margin around each box, in pixels of the 1024 px frame.

    Returns
    -------
    dict
        ``boxes`` (evaluated), ``hits``, ``hit_rate``, ``centre_hits``, ``centre_hit_rate``,
        ``per_class`` (same figures), ``tolerance`` and ``items`` (one per box: image, class,
        box, peak, hit, centre hit). Rates are ``None`` without any box.
    """
    from triage_core.cam import CamExplainer, ExplanationError
    from triage_core.imaging import load_image

    explainer = CamExplainer(model, spec, device="cpu")
    items: list[dict[str, Any]] = []
    for name, image_boxes in sorted(boxes_by_image(boxes, spec.class_names).items()):
        path = images.get(name)
        if path is None:
            continue
        image = load_image(path)
        maps: dict[str, np.ndarray] = {}
        for box in image_boxes:
            if box.label not in maps:
                try:
                    cam = explainer.explain(image, spec.class_names.index(box.label))
                except ExplanationError as exc:
                    logger.warning("pointing game: no Grad-CAM for %s: %s", name, exc)
                    continue
                maps[box.label] = cam.heatmap
            peak = peak_in_nih_frame(maps[box.label])
            centre = NIH_SIDE / 2.0
            items.append(
                {
                    "image": name,
                    "class": box.label,
                    "box": [box.x, box.y, box.w, box.h],
                    "image_side": int(max(image.shape)),
                    "peak": None if peak is None else [round(peak[0], 1), round(peak[1], 1)],
                    "hit": peak is not None and box.contains(*peak, tolerance),
                    "centre_hit": box.contains(centre, centre, tolerance),
                }
            )
    return _summary(items, spec.class_names, tolerance)


def _rates(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(items)
    hits = sum(1 for it in items if it["hit"])
    centre = sum(1 for it in items if it["centre_hit"])
    return {
        "boxes": n,
        "hits": hits,
        "hit_rate": hits / n if n else None,
        "centre_hits": centre,
        "centre_hit_rate": centre / n if n else None,
    }


def _summary(
    items: list[dict[str, Any]], class_names: Sequence[str], tolerance: float
) -> dict[str, Any]:
    out = _rates(items)
    out["per_class"] = {
        name: _rates([it for it in items if it["class"] == name])
        for name in class_names
        if any(it["class"] == name for it in items)
    }
    out["tolerance"] = tolerance
    out["items"] = items
    return out


def format_pointing(result: Mapping[str, Any]) -> str:
    """One line for logs and reports."""
    if not result.get("boxes"):
        return "pointing game: no boxed image of the model's classes among the images"
    return (
        f"pointing game: Grad-CAM maximum in the box {result['hits']}/{result['boxes']} "
        f"({result['hit_rate']:.0%}), image centre {result['centre_hits']}/{result['boxes']} "
        f"({result['centre_hit_rate']:.0%}), tolerance {result['tolerance']:g} px of 1024"
    )


def draw_box(ax: Any, box: Box, height: int, width: int, **style: Any) -> None:
    """Draw ``box`` (1024 px frame) on a matplotlib axis showing a ``height x width`` image."""
    from matplotlib.patches import Rectangle

    sx, sy = width / NIH_SIDE, height / NIH_SIDE
    params = {"fill": False, "edgecolor": "lime", "linewidth": 1.5, **style}
    ax.add_patch(Rectangle((box.x * sx, box.y * sy), box.w * sx, box.h * sy, **params))


__all__ = [
    "Box",
    "boxes_by_image",
    "draw_box",
    "format_pointing",
    "peak_in_nih_frame",
    "pointing_game",
    "read_boxes",
]
