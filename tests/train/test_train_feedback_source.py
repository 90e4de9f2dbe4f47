"""The readers' export as a training source (issue 23, item 1; the round trip issue 17 left
untested).

A real `triage serve` receives NIH chest images as DICOM (DCMTK `dcmsend`), a reader gives
verdicts through the HTTP API, `triage feedback export` writes the training set, and
`triage train --cv 2 --source EXPORT_IMAGES,EXPORT_LABELS,3` trains on it. The test records
the dataset and the weighted sampler that the fit loop builds for each fold and finds every
exported image in it, with the exported labels as targets and weight 3 (the main images 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

NODE_TESTS = Path(__file__).resolve().parents[1] / "node"
if str(NODE_TESTS) not in sys.path:  # the node tests' helpers (a real node, DCMTK, the API)
    sys.path.insert(0, str(NODE_TESTS))

from test_node_e2e import wait_for  # noqa: E402
from test_node_support import ServeProcess, free_port, needs_dcmtk  # noqa: E402
from test_web_browser import dcmsend, wrap_png  # noqa: E402
from test_web_feedback import api, token_add  # noqa: E402

pytestmark = [
    needs_dcmtk,
    pytest.mark.skipif(not Path("/usr/bin/dcmsend").exists(), reason="DCMTK is not installed"),
]

WEIGHT = 3.0


def _export_with_verdicts(tmp_path: Path, checkpoint: Path, pngs: list[Path]) -> Path:
    """Four studies of four patients through a node; verdicts on three; their export."""
    import pydicom

    files = [wrap_png(png, tmp_path / f"s{i}.dcm", 900 + i) for i, png in enumerate(pngs)]
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files]
    storage = tmp_path / "storage"
    reader = token_add(storage, "dr.reed", "reader")
    port, http_port = free_port(), free_port()
    args = [
        "serve", "--port", str(port), "--bind-address", "127.0.0.1", "--storage",
        str(storage), "--model", str(checkpoint), "--stable-age", "1",
        "--http-port", str(http_port), "--threads", "1",
    ]  # fmt: skip
    serve = ServeProcess(args, tmp_path / "serve.log").start()
    try:
        serve.wait_ready(port)
        dcmsend(port, files)

        def all_done() -> bool:
            rows = {r["study_uid"]: r for r in api(http_port, "/api/worklist", reader)["items"]}
            return all(rows.get(u, {}).get("status") == "done" for u in uids)

        wait_for(all_done, 600, "every study processed", serve.log)
        a, b, c = api(http_port, f"/api/studies/{uids[0]}", reader)["findings"]
        verdicts = [
            {a: "present", b: "absent", c: "absent"},
            {a: "absent", b: "absent", c: "absent"},
            {a: "absent", b: "present", c: "present"},
        ]  # the fourth study has no verdict: not exported
        for uid, given in zip(uids, verdicts, strict=False):
            for finding, verdict in given.items():
                body = {"finding": finding, "verdict": verdict}
                api(http_port, f"/api/studies/{uid}/feedback", reader, body)
    finally:
        serve.stop()
    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node", "feedback", "export", "--storage", str(storage),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 images of 3 studies" in proc.stdout
    return out


def test_feedback_export_round_trips_into_training_with_its_weight(
    tmp_path: Path,
    tiny_checkpoint: Path,
    cxr14_dir: Path,
    one_torch_thread: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicom_node.cli import main
    from training import fit as fit_module
    from training.recipe import Recipe
    from training.splits import load_task_data
    from triage_core.imaging import load_image, to_tensor

    export = _export_with_verdicts(
        tmp_path, tiny_checkpoint, sorted(cxr14_dir.glob("full/*.png"))[:4]
    )
    exported, index = load_task_data(export / "images", export / "labels.csv", "multilabel")
    assert len(exported) == 3
    assert exported.targets.sum(axis=0).tolist() == [1, 1, 1]  # a; b and c; none

    # what the fit loop builds: its dataset (rows, targets) and its weighted sampler
    datasets: list[Any] = []
    samplers: list[list[float]] = []

    class RecordingDataset(fit_module.CachedImageDataset):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            datasets.append(self)

    class RecordingSampler(torch.utils.data.WeightedRandomSampler):
        def __init__(self, weights: Any, *args: Any, **kwargs: Any) -> None:
            samplers.append([float(w) for w in weights])
            super().__init__(weights, *args, **kwargs)

    monkeypatch.setattr(fit_module, "CachedImageDataset", RecordingDataset)
    monkeypatch.setattr(torch.utils.data, "WeightedRandomSampler", RecordingSampler)

    run = tmp_path / "cv"
    argv = [
        "train", "--cv", "2", "--images", str(cxr14_dir / "256"), "--labels",
        str(cxr14_dir / "labels.csv"), "--max-images", "32", "--image-size", "64",
        "--epochs", "1", "--ema", "0", "--pretrained", "none", "--threads", "1",
        "--no-progress", "--out", str(run),
        "--source", f"{export / 'images'},{export / 'labels.csv'},{WEIGHT}",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((run / "cv.json").read_text())
    (source,) = summary["sources"]
    assert source["n_images"] == 3 and source["weight"] == WEIGHT
    assert summary["extra_images_per_fold"] == [3, 3]  # new patients: in every fold
    assert len(datasets) == len(samplers) == 2  # one per fold

    spec = Recipe(image_size=64, pretrained="none").spec()
    expected = [
        to_tensor(load_image(index[r.image_index]), spec).to(torch.float16)
        for r in exported.records
    ]
    for dataset, weights in zip(datasets, samplers, strict=True):
        assert len(weights) == len(dataset)
        rows = []
        for tensor, target in zip(expected, exported.targets, strict=True):
            hits = [i for i in range(len(dataset)) if torch.equal(dataset.images[i], tensor)]
            assert len(hits) == 1, "an exported image is not (once) in the training rows"
            rows.append(hits[0])
            assert dataset.targets[hits[0]].tolist() == target.tolist()  # the readers' labels
        assert [weights[i] for i in rows] == [WEIGHT] * 3
        others = np.delete(np.asarray(weights), rows)
        assert len(others) == len(dataset) - 3 and set(others.tolist()) == {1.0}
