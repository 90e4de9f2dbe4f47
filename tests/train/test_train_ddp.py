"""The one fit loop data-parallel on 2 CPU processes (gloo, DistributedDataParallel): spawned
ranks end with the same weights, and ``torchrun ... train --cv 2`` writes one run."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

IMAGES = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, images_dir: str, labels: str, out: str) -> None:
    """One spawned rank: join the group, fit, save its weights and step count."""
    import torch.distributed as tdist

    from training.data import load_tensors
    from training.fit import fit
    from training.recipe import Recipe
    from training.splits import load_task_data

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data, index = load_task_data(Path(images_dir), Path(labels), "multilabel", IMAGES)
        recipe = Recipe(arch="resnet18", image_size=32, epochs=1, batch_size=4, ema=0.9)
        spec = recipe.spec()
        x = load_tensors([index[r.image_index] for r in data.records], spec)
        state = Path(out) / "state.pt"
        result = fit(recipe, x, data.targets, spec, state_path=state, fingerprint="ddp")
        assert result.ema is not None
        torch.save(
            {
                "model": result.model.state_dict(),
                "ema": result.ema.state_dict(),
                "steps": result.optimizer_steps,
                "images": result.history[0]["images"],
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        tdist.destroy_process_group()


def test_two_spawned_ranks_fit_the_same_weights(cxr14_dir: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from training.state import load_state

    args = (2, _free_port(), str(cxr14_dir / "256"), str(cxr14_dir / "labels.csv"), str(tmp_path))
    mp.spawn(_rank, args=args, nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("model", "ema"):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), key
    # each rank stepped over its half of the images (DistributedSampler, last batch dropped)
    assert r0["steps"] == r1["steps"] == math.ceil(IMAGES / 2) // 4
    assert r0["images"] == 2 * r0["steps"] * 4
    state = load_state(tmp_path / "state.pt")  # rank 0 alone writes it
    assert state["world_size"] == 2 and state["epoch"] == 1
    assert all(torch.equal(state["model"][k], r0["model"][k]) for k in r0["model"])


def test_torchrun_two_processes_write_one_cv_run(cxr14_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dicom_node.cli", "train", "--cv", "2",
        "--arch", "resnet18", "--task", "multilabel", "--ema", "0",
        "--images", str(cxr14_dir / "256"), "--labels", str(cxr14_dir / "labels.csv"),
        "--out", str(out), "--epochs", "1", "--batch-size", "4", "--image-size", "32",
        "--max-images", "32", "--threads", "1", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone writes: one line per fold, one table, no state left behind
    assert proc.stdout.count("fold 1/2 done") == 1 and proc.stdout.count("OOF AUROC") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "cv.json", "fold0", "fold1", "folds.csv", "oof.csv",
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "fold0").iterdir()) == [
        "model.json", "model.safetensors", "predictions.npz",
    ]  # fmt: skip
    summary = json.loads((out / "cv.json").read_text())
    assert summary["world_size"] == 2 and summary["data"]["images"] == 32
    fold = json.loads((out / "fold0" / "model.json").read_text())
    n_train = 32 - summary["data"]["per_fold_images"][0]
    steps = math.ceil(n_train / 2) // 4
    assert fold["training"]["history"][0]["images"] == 2 * 4 * steps
