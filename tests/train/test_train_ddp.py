"""``torchrun`` with 2 CPU processes (gloo, DistributedDataParallel) runs ``triage train``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from triage_core.models import load_checkpoint


def test_two_process_gloo_torchrun_writes_one_checkpoint(cxr14_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dicom_node.cli", "train",
        "--arch", "resnet18", "--task", "multilabel",
        "--images", str(cxr14_dir / "256"), "--labels", str(cxr14_dir / "labels.csv"),
        "--out", str(out), "--epochs", "1", "--batch-size", "4", "--image-size", "64",
        "--max-images", "32", "--threads", "1", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone writes: one checkpoint, one state file, one "saved" line
    weights = sorted(out.glob("*.safetensors"))
    assert [p.name for p in weights] == ["cxr-triage-resnet18-multilabel.safetensors"]
    assert proc.stdout.count("saved ") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "cxr-triage-resnet18-multilabel.json",
        "cxr-triage-resnet18-multilabel.onnx",  # the serving graph, checked against torch
        "cxr-triage-resnet18-multilabel.safetensors",
        "last.pt",
    ]
    _, spec = load_checkpoint(out / "cxr-triage-resnet18-multilabel")
    assert spec.training["world_size"] == 2
    assert spec.training["epochs_run"] == 1
    # each rank stepped over its half of the training images (DistributedSampler)
    from training.train import load_training_state

    n_train = spec.training["data"]["split"]["sizes"]["train"]
    state = load_training_state(out / "last.pt")
    steps = int(next(iter(state["optimizer"]["state"].values()))["step"])
    assert steps == math.ceil(n_train / 2) // 4
    spec_json = json.loads((out / "cxr-triage-resnet18-multilabel.json").read_text())
    assert spec_json["training"]["data"]["split"]["sizes"]["train"] > 0
