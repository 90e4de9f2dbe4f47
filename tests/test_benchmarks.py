"""Every benchmark runs to its end in ``--quick`` mode and prints the ratios it exists for
(issue 25, item 5): a benchmark that breaks, or silently stops measuring one of its sections,
fails CI instead of waiting for the next person who wants a figure.

The figures themselves are not judged here (a shared CI machine is no place for timings): each
ratio must be a positive finite number, or ``n/a`` with the reason its baseline is missing.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SHARED_DATA

BENCHMARKS = REPO_ROOT / "benchmarks"
RATIO = re.compile(r"^RATIO (?P<name>.+?): (?:(?P<value>\S+)x|n/a \((?P<why>.+)\))", re.M)
#: The ratio lines (their name's start) that each benchmark must print.
EXPECTED: dict[str, tuple[str, ...]] = {
    "bench_core": ("core efficientnet_b0 Predictor", "core resnet18 Grad-CAM"),
    "bench_e2e": ("e2e p95 latency", "e2e workers / bare Predictor"),
    "bench_ingest": (
        "ingest C-STORE small 1 assoc, triage / Orthanc",
        "ingest C-STORE large 1 assoc, triage / Orthanc",
        "ingest C-STORE small, triage 4 assoc / 1 assoc",
        "ingest STOW-RS small x30, 1 instance/request / C-STORE",
        "ingest STOW-RS large x30, all in 1 request / Orthanc's",
        "ingest STOW-RS small x30, 4 clients / 1 client",
    ),
    "bench_net_memory": ("net memory, worst hostile connection",),
    "bench_runtime": (
        "runtime efficientnet_lite0 batch 1, torch / ONNX Runtime",
        "runtime efficientnet_lite0 batch 16, torch / ONNX Runtime",
        "runtime workers, onnxruntime / torch",
        "runtime first C-ECHO after start, triage serve / Orthanc",
        "runtime idle RSS, triage serve / Orthanc",
    ),
    "bench_training": ("training CV step / minimal hand-written loop",),
}
#: Benchmarks that read the shared NIH images or chest DICOMs.
NEEDS_SHARED = {"bench_training", "bench_runtime"}
#: Wall-clock bound of one ``--quick`` run on the 2-core CI machine.
TIMEOUT_S = 600


def _benchmarks() -> list[Path]:
    return sorted(BENCHMARKS.glob("bench_*.py"))


def test_every_benchmark_is_listed() -> None:
    """A new benchmark gets its expected ratios here (and so its place in CI)."""
    assert {p.stem for p in _benchmarks()} == set(EXPECTED)


@pytest.mark.parametrize("script", _benchmarks(), ids=lambda p: p.stem)
def test_quick_mode_finishes_and_prints_its_ratios(script: Path, tmp_path: Path) -> None:
    if script.stem in NEEDS_SHARED and not (SHARED_DATA / "cxr14").is_dir():
        pytest.skip(f"{script.stem} reads {SHARED_DATA}, which is absent")
    if not Path("/usr/bin/storescu").exists() and script.stem != "bench_training":
        pytest.skip("DCMTK is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO_ROOT,
        env=env,
        check=False,
    )
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, tail
    found = {m["name"]: m for m in RATIO.finditer(proc.stdout)}
    assert found, f"{script.stem} printed no RATIO line\n{tail}"
    for name, match in found.items():
        if match["value"] is not None:
            value = float(match["value"])
            assert math.isfinite(value) and value > 0, f"{name}: {value}"
        else:
            assert match["why"].strip(), name
    for expected in EXPECTED[script.stem]:
        assert any(name.startswith(expected) for name in found), (
            f"{script.stem} no longer prints {expected!r}\n{tail}"
        )
