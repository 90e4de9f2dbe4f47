"""DICOMweb (PS3.18) in one package: the node's STOW-RS, QIDO-RS and WADO-RS, and its client.

Served under ``/dicomweb`` by :func:`dicomweb_router` (:mod:`router`), over :mod:`stow` (store),
:mod:`qido` (search), :mod:`wado` (retrieve; rendered images from :mod:`images`), the index of
stored instances (:mod:`catalog`) and ``multipart/related`` (:mod:`multipart`). The STOW-RS
client that delivers results to a DICOMweb destination is :func:`send_files` (:mod:`stowrs`).
"""

from dicom_node.dicomweb.router import ROOT, dicomweb_router
from dicom_node.dicomweb.stowrs import send_files

__all__ = ["ROOT", "dicomweb_router", "send_files"]
