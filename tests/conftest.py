"""Shared fixtures: real data read in place from ../shared/data, a tiny random checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["pg_fixture"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_TRIAGE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _strict_pydicom() -> Iterator[None]:
    """Fail on invalid values written by our code, as highdicom's test-suite does."""
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.writing_validation_mode = old


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what an in-process ``triage`` command configured (``logsafe.install``): its stderr
    handler is bound to pytest's capture stream, which is closed after the test, and a later
    log call would then print a "Logging error"."""
    import logging
    import sys
    import threading

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test with one torch thread (the CI machine has two cores shared with servers)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set CXR_TRIAGE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    path = shared_data / "dicom"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def cxr14_dir(shared_data: Path) -> Path:
    path = shared_data / "cxr14"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ResNet-18 checkpoint at 64 px (plumbing only, not a real model),
    with its ONNX serving graph (checked against torch on two noise images)."""
    import numpy as np
    import torch

    from training.onnx_export import export_onnx
    from triage_core.models import create_model, default_spec, save_checkpoint

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, pretrained=None)
    spec = default_spec("resnet18").replace(input_size=64, name="random-test-model", version="0")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, spec, path)
    noise = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    export_onnx(path, noise)
    return path
