"""The OHIF viewer installed once per test run from npm, shared by test_viewer*.py.

:func:`ohif_storage` runs ``npm pack`` and the real install once per run (the folder under
pytest's base temporary folder is reused by every module that asks); without npm or the
registry the tests that need it are skipped with npm's reason. A wrong integrity is a failure,
not a skip. :func:`copy_viewer` gives a node's storage folder the viewer as hard links.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dicom_node.web.viewer_install import (
    NpmUnavailable,
    install_viewer,
    installed_viewer,
    npm_pack,
    viewer_dir,
)


@pytest.fixture(scope="session")
def ohif_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ohif-app-3.13.2.tgz`` from ``npm pack`` (once per run)."""
    folder = tmp_path_factory.getbasetemp() / "ohif-npm"
    found = sorted(folder.glob("ohif-app-*.tgz")) if folder.is_dir() else []
    if found:
        return found[0]
    folder.mkdir(exist_ok=True)
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the viewer cannot be fetched")
    try:
        return npm_pack(folder, timeout=90)  # an unreachable registry is a skip, not a wait
    except NpmUnavailable as exc:
        pytest.skip(f"npm cannot fetch @ohif/app: {exc}")


@pytest.fixture(scope="session")
def ohif_storage(tmp_path_factory: pytest.TempPathFactory, ohif_tarball: Path) -> Path:
    """A storage folder with the viewer installed by :func:`install_viewer` (once per run)."""
    storage = tmp_path_factory.getbasetemp() / "ohif-storage"
    if installed_viewer(storage) is None:
        install_viewer(storage, ohif_tarball)
    return storage


def copy_viewer(source_storage: Path, storage: Path) -> None:
    """Give ``storage`` the installed viewer of ``source_storage`` (hard links, no copy)."""
    storage.mkdir(parents=True, exist_ok=True)
    shutil.copytree(viewer_dir(source_storage), viewer_dir(storage), copy_function=os.link)
