"""training.data and training.splits: NIH labels, task filters, patient-wise splits, images,
augmentation.

Real label files are read in place from ../shared/data/cxr14; counts are recomputed here with
the csv module independently of the code under test.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    Augment,
    CachedImageDataset,
    DatasetError,
    LabelRecord,
    attach_images,
    index_images,
    read_labels,
    select_task,
)
from training.splits import (
    check_patient_disjoint,
    format_split_summary,
    official_split,
    patient_split,
    split_summary,
)
from triage_core.spec import CLASS_NAMES

TARGETS = set(CLASS_NAMES)


def _independent_counts(csv_path: Path) -> dict[str, object]:
    """Per-task counts straight from the CSV (no training code involved)."""
    multiclass: Counter[str] = Counter()
    positives: Counter[str] = Counter()
    rows = 0
    none = 0
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows += 1
            hits = set(row["Finding Labels"].split("|")) & TARGETS
            if len(hits) == 1:
                multiclass[next(iter(hits))] += 1
            for hit in hits:
                positives[hit] += 1
            if not hits:
                none += 1
    return {"rows": rows, "multiclass": multiclass, "positives": positives, "none": none}


def test_task_filters_match_independent_counts(cxr14_dir: Path) -> None:
    labels = cxr14_dir / "labels.csv"
    expected = _independent_counts(labels)
    records = read_labels(labels)
    assert len(records) == expected["rows"]

    mc = select_task(records, "multiclass")
    mc_counts = Counter(CLASS_NAMES[i] for i in mc.targets)
    assert mc_counts == expected["multiclass"]
    assert len(mc) == sum(expected["multiclass"].values())  # type: ignore[attr-defined]
    assert all(mc_counts[name] > 0 for name in CLASS_NAMES)  # every class is represented

    ml = select_task(records, "multilabel")
    assert len(ml) == expected["rows"]
    counts = ml.class_counts()
    assert counts["none"] == expected["none"]
    for name in CLASS_NAMES:
        assert counts[name] == expected["positives"][name]  # type: ignore[index]
    assert ml.targets.shape == (expected["rows"], 3) and set(np.unique(ml.targets)) <= {0.0, 1.0}


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_seeded_split_is_patient_disjoint_and_60_20_20(
    cxr14_dir: Path, task: str, seed: int
) -> None:
    records = read_labels(cxr14_dir / "labels.csv")
    data = select_task(records, task)
    split = patient_split(data, seed=seed)
    check_patient_disjoint(data, split)
    patients = [
        {data.records[i].patient_id for i in idx} for idx in (split.train, split.val, split.test)
    ]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2])
    assert not (patients[1] & patients[2])
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert sorted(all_idx.tolist()) == list(range(len(data)))  # every image exactly once
    n = len(data)
    assert abs(len(split.train) / n - 0.6) < 0.05
    assert abs(len(split.val) / n - 0.2) < 0.05
    # deterministic from the seed
    again = patient_split(select_task(records, task), seed=seed)
    assert np.array_equal(again.test, split.test)
    summary = split_summary(data, split)
    assert sum(row["images"] for row in summary.values()) == n
    table = format_split_summary(summary)
    assert table.splitlines()[1].startswith("train") and "patients" in table


def test_full_label_file_parses_and_splits_patient_wise(cxr14_dir: Path) -> None:
    records = read_labels(cxr14_dir / "Data_Entry_2017.csv")
    assert len(records) == 112_120
    assert records[0].image_index == "00000001_000.png" and records[0].age == 57
    data = select_task(records, "multilabel")
    split = patient_split(data, seed=3)
    check_patient_disjoint(data, split)
    assert len({r.patient_id for r in records}) == 30_805  # NIH: 30,805 patients
    # NIH's published per-finding image counts
    assert data.class_counts() == {
        "Atelectasis": 11_559,
        "Effusion": 13_317,
        "Infiltration": 19_894,
        "none": 76_650,
    }


def test_official_lists_split(cxr14_dir: Path, tmp_path: Path) -> None:
    records = read_labels(cxr14_dir / "labels.csv")
    data = select_task(records, "multilabel")
    patients = sorted({r.patient_id for r in data.records})
    test_patients = set(patients[::5])
    test_names = [r.image_index for r in data.records if r.patient_id in test_patients]
    tv_names = [r.image_index for r in data.records if r.patient_id not in test_patients]
    (tmp_path / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(tv_names[:-5]) + "\n")
    split = official_split(
        data, tmp_path / "train_val_list.txt", tmp_path / "test_list.txt", seed=0
    )
    check_patient_disjoint(data, split)
    assert {data.records[i].image_index for i in split.test} == set(test_names)
    assert split.info["left_out"] == 5
    assert len(split.train) + len(split.val) == len(tv_names) - 5

    # the same image on both lists, or one patient's images on both, is refused
    (tmp_path / "tv2.txt").write_text("\n".join([*tv_names, test_names[0]]) + "\n")
    with pytest.raises(DatasetError, match="both split lists"):
        official_split(data, tmp_path / "tv2.txt", tmp_path / "test_list.txt")
    by_patient: dict[str, list[str]] = {}
    for r in data.records:
        by_patient.setdefault(r.patient_id, []).append(r.image_index)
    first, second = next(v for v in by_patient.values() if len(v) >= 2)[:2]
    (tmp_path / "tv3.txt").write_text(first + "\n")
    (tmp_path / "test3.txt").write_text(second + "\n")
    with pytest.raises(DatasetError, match="patients have images in both"):
        official_split(data, tmp_path / "tv3.txt", tmp_path / "test3.txt")


def test_kaggle_2017_layout_and_bad_files(tmp_path: Path) -> None:
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
    )
    rows = [
        "00000001_000.png,Cardiomegaly,0,00001,058Y,M,PA,2682,2749,0.143,0.143,\n",
        "00000002_000.png,Effusion|Atelectasis,0,00002,081Y,F,AP,2500,2048,0.171,0.171,\n",
        "00000003_000.png,No Finding,0,00003,074Y,F,PA,2500,2048,0.168,0.168,\n",
    ]
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(header + "".join(rows))
    records = read_labels(path)
    assert [r.patient_id for r in records] == ["1", "2", "3"]
    assert records[0].age == 58 and records[1].labels == ("Effusion", "Atelectasis")
    assert records[1].view == "AP"
    # row 2 has two target findings, the others none: nothing for the multiclass protocol
    with pytest.raises(DatasetError, match="no image left"):
        select_task(records, "multiclass")
    assert select_task(records, "multilabel").class_counts() == {
        "Atelectasis": 1,
        "Effusion": 1,
        "Infiltration": 0,
        "none": 2,
    }

    (tmp_path / "dup.csv").write_text(header + rows[0] + rows[0])
    with pytest.raises(DatasetError, match="duplicate Image Index"):
        read_labels(tmp_path / "dup.csv")
    (tmp_path / "cols.csv").write_text("Image Index,Labels\nx.png,Effusion\n")
    with pytest.raises(DatasetError, match="lacks column"):
        read_labels(tmp_path / "cols.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DatasetError, match="empty"):
        read_labels(tmp_path / "empty.csv")
    with pytest.raises(DatasetError, match="does not exist|No such file"):
        read_labels(tmp_path / "missing.csv")
    with pytest.raises(DatasetError, match="unknown task"):
        select_task(records, "segmentation")


def test_index_images_flat_and_official_layout(tmp_path: Path) -> None:
    gray = Image.fromarray(np.full((8, 8), 100, dtype=np.uint8))
    flat = tmp_path / "flat"
    flat.mkdir()
    gray.save(flat / "00000001_000.png")
    (flat / "notes.txt").write_text("not an image")
    official = tmp_path / "nih"
    for folder, name in (("images_001", "00000001_000.png"), ("images_012", "00000002_000.png")):
        (official / folder / "images").mkdir(parents=True)
        gray.save(official / folder / "images" / name)
    assert set(index_images(flat)) == {"00000001_000.png"}
    found = index_images(official)
    assert set(found) == {"00000001_000.png", "00000002_000.png"}
    assert found["00000002_000.png"].parent.parent.name == "images_012"
    with pytest.raises(DatasetError, match="does not exist"):
        index_images(tmp_path / "nowhere")
    records = read_labels_rows(tmp_path)
    kept, paths = attach_images(records, found)
    assert [r.image_index for r in kept] == ["00000001_000.png", "00000002_000.png"]
    with pytest.raises(DatasetError, match="none of the"):
        attach_images(records, {})


def read_labels_rows(tmp_path: Path) -> list[LabelRecord]:
    path = tmp_path / "labels.csv"
    path.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID\n"
        "00000001_000.png,Effusion,0,1\n00000002_000.png,No Finding,0,2\n"
        "00000009_000.png,Effusion,0,9\n"
    )
    return read_labels(path)


def test_augmentation_is_seeded_and_keeps_shape() -> None:
    import torch

    from triage_core.models import default_spec

    spec = default_spec("resnet18").replace(input_size=64)
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64).to(torch.float16)
    targets = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    ds = CachedImageDataset(images, targets, spec, augment=Augment(), seed=5)
    plain = CachedImageDataset(images, targets, spec, augment=None)
    x0, y0 = ds[1]
    x1, _ = ds[1]
    assert x0.shape == (3, 64, 64) and x0.dtype == torch.float32
    assert torch.equal(x0, x1)  # same (seed, epoch, index) -> same augmentation
    assert torch.equal(y0, torch.tensor([0.0, 1.0, 0.0]))
    assert not torch.allclose(x0, plain[1][0])  # it does change the image
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], x0)  # another epoch, another draw
    assert torch.equal(plain[2][0], images[2].float())
    # gray stays gray: the three channels are one intensity, normalised per channel
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    gray = CachedImageDataset(
        ((torch.rand(1, 1, 64, 64).expand(1, 3, 64, 64) - mean) / std).to(torch.float16),
        targets[:1],
        spec,
        augment=Augment(),
    )[0][0]
    raw = gray * std + mean
    # the cache is float16: channels agree to well under one 8-bit grey level (1/255)
    assert torch.allclose(raw[0], raw[1], atol=1e-3) and torch.allclose(raw[0], raw[2], atol=1e-3)
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
