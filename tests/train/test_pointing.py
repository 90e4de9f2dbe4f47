"""Pointing game on the real NIH boxes and the shared images (random 64 px model: plumbing)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training.data import DatasetError, index_images
from training.pointing import (
    NIH_SIDE,
    Box,
    boxes_by_image,
    format_pointing,
    peak_in_nih_frame,
    pointing_game,
    read_boxes,
)
from triage_core.models import load_checkpoint
from triage_core.spec import CLASS_NAMES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: NIH's spelling of a class in the box file -> ours (restated here, not imported).
_SPELLING = {"Infiltrate": "Infiltration"}


def _boxes_of_our_classes(cxr14_dir: Path) -> dict[str, int]:
    """Image name -> number of boxes of our three classes, read with the csv module alone."""
    counts: dict[str, int] = {}
    with (cxr14_dir / "BBox_List_2017.csv").open(newline="") as handle:
        for row in csv.reader(handle):
            label = _SPELLING.get(row[1], row[1]) if len(row) > 1 else ""
            if label in CLASS_NAMES:
                counts[row[0]] = counts.get(row[0], 0) + 1
    return counts


def _pngs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


def test_read_boxes_maps_the_nih_spelling(cxr14_dir: Path) -> None:
    boxes = read_boxes(cxr14_dir / "BBox_List_2017.csv")
    assert len(boxes) == 984  # the NIH file's rows
    labels = {b.label for b in boxes}
    assert "Infiltration" in labels and "Infiltrate" not in labels
    ours = boxes_by_image(boxes, CLASS_NAMES)
    assert {b.label for bs in ours.values() for b in bs} <= set(CLASS_NAMES)
    # the boxed images of our classes, as counted from the file and the folders independently
    shared = set(index_images(cxr14_dir / "256")) | set(index_images(cxr14_dir / "lowres64"))
    expected = set(_boxes_of_our_classes(cxr14_dir))
    assert set(ours) == expected
    assert shared & set(ours) == expected & (
        _pngs(cxr14_dir / "256") | _pngs(cxr14_dir / "lowres64")
    )
    assert shared & set(ours)  # the shared data has boxed images to point at


def test_read_boxes_refuses_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "boxes.csv"
    bad.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\nx.png,Effusion,1,2,abc,4\n")
    with pytest.raises(DatasetError, match="line 2"):
        read_boxes(bad)
    bad.write_text("name,label\n")
    with pytest.raises(DatasetError, match="header"):
        read_boxes(bad)
    with pytest.raises(DatasetError, match="missing.csv"):
        read_boxes(tmp_path / "missing.csv")


def test_peak_and_box_geometry() -> None:
    heat = np.zeros((256, 256), dtype=np.float32)
    heat[10, 200] = 1.0
    assert peak_in_nih_frame(heat) == ((200 + 0.5) * 4, (10 + 0.5) * 4)
    assert peak_in_nih_frame(np.zeros((8, 8))) is None  # an empty map points nowhere
    box = Box("a.png", "Effusion", 100, 200, 50, 60)
    assert box.contains(120, 230) and not box.contains(90, 230)
    assert box.contains(90, 230, tolerance=15)
    assert not box.contains(NIH_SIDE / 2, NIH_SIDE / 2, tolerance=15)


def test_pointing_game_on_shared_images(cxr14_dir: Path, tiny_checkpoint: Path) -> None:
    model, spec = load_checkpoint(tiny_checkpoint)
    every = {**index_images(cxr14_dir / "lowres64"), **index_images(cxr14_dir / "256")}
    # a dozen boxed images from each folder keep the test short (the game itself is per box)
    boxed = _boxes_of_our_classes(cxr14_dir)
    chosen = sorted(boxed.keys() & _pngs(cxr14_dir / "lowres64"))[:12]
    chosen += sorted(boxed.keys() & _pngs(cxr14_dir / "256"))[:12]
    images = {name: every[name] for name in chosen} | {
        name: path for name, path in list(every.items())[:20] if name not in boxed
    }
    n_boxes = sum(boxed[name] for name in chosen)
    boxes = read_boxes(cxr14_dir / "BBox_List_2017.csv")
    result = pointing_game(model, spec, boxes, images)
    json.dumps(result)  # goes into metrics.json as it is
    assert result["boxes"] == n_boxes == len(result["items"])
    # the centre baseline follows from the boxes alone
    centre = NIH_SIDE / 2
    expected = sum(
        Box(it["image"], it["class"], *it["box"]).contains(centre, centre, 15)
        for it in result["items"]
    )
    assert result["centre_hits"] == expected
    for item in result["items"]:
        if item["peak"] is None:
            assert item["hit"] is False
        else:
            box = Box(item["image"], item["class"], *item["box"])
            assert item["hit"] == box.contains(*item["peak"], 15)
    assert sum(v["boxes"] for v in result["per_class"].values()) == n_boxes
    assert "pointing game:" in format_pointing(result)
    empty = pointing_game(model, spec, boxes, {})
    assert empty["boxes"] == 0 and empty["hit_rate"] is None
    assert "no boxed image" in format_pointing(empty)


def test_pointing_grid_and_cam_grid_show_boxes(
    cxr14_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from training.data import read_labels
    from training.evaluate import plot_cam_grid, plot_pointing_grid

    model, spec = load_checkpoint(tiny_checkpoint)
    boxed = _boxes_of_our_classes(cxr14_dir)
    chosen = sorted(boxed.keys() & _pngs(cxr14_dir / "256"))[:3]
    every = index_images(cxr14_dir / "256")
    images = {name: every[name] for name in chosen} | dict(list(every.items())[:10])
    boxes = read_boxes(cxr14_dir / "BBox_List_2017.csv")
    result = pointing_game(model, spec, boxes, images)
    assert result["boxes"] == sum(boxed[name] for name in images if name in boxed)
    assert plot_pointing_grid(tmp_path / "pointing.png", model, spec, result, images)
    assert (tmp_path / "pointing.png").stat().st_size > 1000
    records = [r for r in read_labels(cxr14_dir / "labels.csv") if r.image_index in images][:6]
    boxed = boxes_by_image(boxes, spec.class_names)
    boxed_record = next(
        r
        for r in read_labels(cxr14_dir / "labels.csv")
        if r.image_index in boxed and r.image_index in images
    )
    records.append(boxed_record)
    paths = [images[r.image_index] for r in records]
    probs = np.full((len(records), 3), 0.5, dtype=np.float32)
    assert plot_cam_grid(tmp_path / "grid.png", model, spec, paths, records, probs, 2, boxed)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert not plot_pointing_grid(tmp_path / "none.png", model, spec, {"items": []}, images)
