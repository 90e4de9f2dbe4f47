"""PNG views of a study's files: the Grad-CAM Secondary Capture we wrote and its source image.

Files are found from UIDs that were checked against the DICOM UID grammar (digits and dots
only), so no request can name a path outside the storage folder:

- the SC: ``STORAGE/outbox/<study>/<sop>.dcm``, the one file there whose SOP Class is a
  Secondary Capture (the SR lies beside it);
- a received image: ``STORAGE/spool/<study>/<series>/<sop>.dcm`` (the spool's layout).

The SC is shown from its own pixels (what the PACS received), the source image windowed as the
model's preprocessing windows it (:func:`triage_core.imaging.window_dicom`). Both are reduced to
at most :data:`MAX_SIDE` pixels and kept in a small LRU cache (files never change once written).
"""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path

from triage_core.uids import is_valid_uid

logger = logging.getLogger(__name__)

#: SOP Classes of the Grad-CAM overlay we write (Secondary Capture, single and multi-frame).
SC_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)
MAX_SIDE = 1024


class ImageNotFound(LookupError):
    """No such file for the study (not written, purged, or an unknown UID)."""


def find_sc(outbox: Path, study_uid: str) -> tuple[Path, str]:
    """The Grad-CAM SC of ``study_uid`` and its source image's SOP Instance UID ("" unknown)."""
    import pydicom

    if not is_valid_uid(study_uid):
        raise ImageNotFound("not a UID")
    folder = outbox / study_uid
    for path in sorted(folder.glob("*.dcm")) if folder.is_dir() else []:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any unreadable file is simply not the SC
            logger.warning("outbox file %s is not readable DICOM", path.name)
            continue
        if str(ds.get("SOPClassUID", "")) in SC_CLASSES:
            source = ""
            for item in ds.get("SourceImageSequence", []):
                source = str(item.get("ReferencedSOPInstanceUID", ""))
                break
            return path, source
    raise ImageNotFound("no Grad-CAM Secondary Capture for this study")


def spool_file(spool: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where the spool keeps a received instance (every UID checked)."""
    if not all(is_valid_uid(u) for u in (study_uid, series_uid, sop_uid)):
        raise ImageNotFound("not a UID")
    path = spool / study_uid / series_uid / f"{sop_uid}.dcm"
    if not path.is_file():
        raise ImageNotFound("the image is no longer in the spool")
    return path


def _png(array: object) -> bytes:
    import numpy as np
    from PIL import Image

    data = np.asarray(array)
    if data.dtype != np.uint8:
        data = np.clip(np.rint(data.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(data)
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


@functools.lru_cache(maxsize=64)
def sc_png(path: Path, mtime_ns: int) -> bytes:
    """The SC's own pixels (RGB, or grey) as PNG; ``mtime_ns`` keys the cache."""
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if pixels.dtype != np.uint8:
        top = float(pixels.max()) or 1.0
        pixels = pixels.astype(np.float32) / top
    return _png(pixels)


@functools.lru_cache(maxsize=64)
def source_png(path: Path, mtime_ns: int) -> bytes:
    """A received image windowed for display (as the model's preprocessing does) as PNG."""
    from triage_core.imaging import read_dataset, window_dicom

    return _png(window_dicom(read_dataset(path)))


def render(path: Path, kind: str) -> bytes:
    """``kind`` ``sc`` or ``source``: the cached PNG of ``path``."""
    mtime = path.stat().st_mtime_ns
    return sc_png(path, mtime) if kind == "sc" else source_png(path, mtime)
