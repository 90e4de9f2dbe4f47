"""DICOMweb (PS3.18) in one package: the node's STOW-RS, QIDO-RS and WADO-RS, and its client.

Served under ``/dicomweb`` by :func:`dicomweb_router` (:mod:`router`), over :mod:`stow` (store),
:mod:`qido` (search), :mod:`wado` (retrieve instances, metadata, bulk data), the routes viewers
draw from (:mod:`pixels`: frames from :mod:`frames`, rendered images and thumbnails from
:mod:`rendering`), the index of stored instances (:mod:`catalog`) and ``multipart/related``
(:mod:`multipart`). :mod:`images` gives the worklist pages their PNG views. The STOW-RS
client that delivers results to a DICOMweb destination is :func:`send_files` (:mod:`stowrs`).

The names are imported on first use: a ``triage worker`` delivers by STOW-RS without loading
the HTTP server's stack (FastAPI) that the routes need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.dicomweb.router import ROOT, dicomweb_router
    from dicom_node.dicomweb.stowrs import send_files

_HOME = {"ROOT": "router", "dicomweb_router": "router", "send_files": "stowrs"}

__all__ = [
    "ROOT",
    "dicomweb_router",
    "send_files",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
