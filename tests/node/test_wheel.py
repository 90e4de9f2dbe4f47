"""The built wheel holds every package and its data: installed alone, each subpackage imports.

The wheel is built from a copy of the sources (so no ``build/`` or ``*.egg-info`` lands in the
working tree), installed with ``--no-deps`` into a scratch ``venv --system-site-packages``
that sees the test interpreter's dependencies, and imported from a folder outside the
repository without ``PYTHONPATH``: every module must come from the scratch venv, and the
pages' templates and static files and the shipped checkpoint must be there. A package left
out of ``[tool.setuptools.packages.find]`` (or data out of ``package-data``) fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("dicom_node", "triage_core", "training")


def _source_packages() -> list[str]:
    """Every package (a folder with ``__init__.py``) of the three, as dotted names."""
    names = []
    for top in PACKAGES:
        for init in sorted((REPO / top).rglob("__init__.py")):
            if "__pycache__" not in init.parts:
                names.append(".".join(init.parent.relative_to(REPO).parts))
    return names


_PROBE = """
import importlib, json, sys
from pathlib import Path
names = json.loads(sys.argv[1])
files = {}
for name in names:
    module = importlib.import_module(name)
    files[name] = module.__file__
import dicom_node, triage_core
web = Path(importlib.import_module("dicom_node.web").__file__).parent
weights = Path(triage_core.__file__).parent / "weights"
print(json.dumps({
    "files": files,
    "templates": sorted(p.name for p in (web / "templates").glob("*.html")),
    "static": sorted(p.name for p in (web / "static").glob("*")),
    "weights": sorted(p.name for p in weights.glob("*")),
    "typed": [
        (Path(importlib.import_module(n).__file__).parent / "py.typed").is_file()
        for n in ("dicom_node", "triage_core", "training")
    ],
}))
"""


def _run(
    args: list[str], timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=env
    )
    assert proc.returncode == 0, f"{args[:3]}...\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.timeout(300)
def test_wheel_installs_every_subpackage_and_its_data(tmp_path: Path) -> None:
    # the build backend, without build isolation (no index here); the dev extra brings it
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools installed")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for top in PACKAGES:
        shutil.copytree(REPO / top, src / top, ignore=ignore)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(dist), str(src)],
        240,
    )
    (wheel,) = dist.glob("cxr_triage-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], 60)
    python = venv / "bin" / "python"
    purelib = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 30
        ).stdout.strip()
    )
    # this interpreter's dependencies (a plain path: its .pth files, such as an editable
    # install of this repository, are not run)
    (purelib / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q"]
        + ["--no-index", str(wheel)],
        120,
    )

    names = _source_packages()
    assert {"dicom_node.commands", "dicom_node.stages", "dicom_node.dicomweb"} <= set(names)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    probe = _run([str(python), "-c", _PROBE, json.dumps(names)], 120, cwd=outside, env=env)
    found = json.loads(probe.stdout)

    root = venv.resolve()
    for name, file in found["files"].items():
        assert file is not None, name
        path = Path(file).resolve()
        assert path.is_relative_to(root), f"{name} imported from {path}, not the wheel"
        assert not path.is_relative_to(REPO), name
    templates = sorted(p.name for p in (REPO / "dicom_node/web/templates").glob("*.html"))
    assert found["templates"] == templates
    assert found["static"] == sorted(p.name for p in (REPO / "dicom_node/web/static").iterdir())
    assert found["weights"] == sorted(p.name for p in (REPO / "triage_core/weights").iterdir())
    assert all(found["typed"])
