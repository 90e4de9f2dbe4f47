"""WADO-RS rendered images and thumbnails (PS3.18 8.3.5, 10.4.1.1.5, 10.4.1.1.6).

One frame of an instance becomes a JPEG (the default) or PNG:

- greyscale: pydicom's Modality LUT (:func:`pydicom.pixels.apply_modality_lut`: Rescale Slope
  and Intercept or a Modality LUT Sequence), then the window: the ``window`` query parameter
  if given, else the instance's first Window Center / Width (and its VOI LUT Function), else
  its VOI LUT Sequence (:func:`pydicom.pixels.apply_voi`), else the frame's own minimum and
  maximum; MONOCHROME1 is inverted, so it shows as it should (white bone);
- colour: as pydicom decodes it (YBR converted to RGB; PALETTE COLOR through its LUT),
  scaled to 8 bits.

The image is then scaled to fit ``viewport=vw,vh`` (aspect ratio kept, PS3.18 8.3.5.1.3; the
cropping form ``vw,vh,sx,sy,sw,sh`` is refused) or, without one, reduced to at most
:data:`MAX_SIDE` pixels (a thumbnail to :data:`THUMBNAIL_SIDE`). ``quality`` (1-100) sets the
JPEG quality. Windows follow PS3.3 C.11.2.1.2 (``linear``, ``linear-exact``, ``sigmoid``).

Only the one frame is decoded (:func:`pydicom.pixels.pixel_array` with ``index=``), and the
encoded images are kept in an LRU cache of at most 32 MiB (images up to 1 MiB each; files
never change once written, and the key holds the file's modification time).
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.dicomweb.catalog import read_header
from dicom_node.dicomweb.multipart import MediaType, parse_accept

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: Longest side of a rendered image without a viewport, and of a thumbnail.
MAX_SIDE = 1024
THUMBNAIL_SIDE = 256
#: Largest viewport side we draw.
MAX_VIEWPORT = 4096
JPEG_QUALITY = 90
FUNCTIONS = ("linear", "linear-exact", "sigmoid")
#: The query parameters we read; any other is ignored, as PS3.18 8.3.5.1 lets us.
PARAMETERS = ("viewport", "window", "quality", "accept")


class RenderError(ValueError):
    """A query parameter we cannot use (400), or an instance that is no image (404/406)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RenderRequest:
    """What to draw: the media type, the viewport, the window, the JPEG quality."""

    media_type: str
    viewport: tuple[int, int] | None = None
    window: tuple[float, float, str] | None = None
    quality: int = JPEG_QUALITY


def media_type_of(accept: Sequence[MediaType], query_accept: str | None = None) -> tuple[str, bool]:
    """The image type to give and whether as a one-part ``multipart/related`` body.

    An ``Accept`` header asking for ``multipart/related; type="image/jpeg"`` (or PNG; what
    dicomweb-client's bulk data retrieval sends) gets that. Otherwise the ``accept`` query
    parameter (PS3.18 8.3.3.1, for user agents that cannot set the header: OHIF's thumbnail
    URLs carry ``?accept=image/jpeg``) or else the header chooses a single-part answer:
    ``image/jpeg`` (the default, PS3.18 8.3.5.1.2) or ``image/png``; anything else is 406.
    """
    for media in accept:
        part = media.param("type").lower()
        if media.type == "multipart/related" and part in ("image/jpeg", "image/png"):
            return part, True
    entries = parse_accept(query_accept) if query_accept else list(accept)
    if not entries:
        return "image/jpeg", False
    for media in entries:
        if media.type in ("image/jpeg", "image/png"):
            return media.type, False
        if media.type in ("*/*", "image/*"):
            return "image/jpeg", False
    raise RenderError(406, "rendered images and thumbnails are given as image/jpeg or image/png")


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RenderError(400, f"{name} {text[:20]!r} is not a number") from None
    if not math.isfinite(value):
        raise RenderError(400, f"{name} must be finite")
    return value


def parse_request(accept: Sequence[MediaType], query: Mapping[str, str]) -> RenderRequest:
    """The request's media type and its ``viewport``, ``window`` and ``quality`` parameters.

    Raises
    ------
    RenderError
        406 for an ``Accept`` without JPEG or PNG; 400 for a malformed parameter.
    """
    media_type, _ = media_type_of(accept, query.get("accept"))
    viewport = None
    if (text := query.get("viewport")) is not None:
        parts = text.split(",")
        if len(parts) != 2:
            raise RenderError(
                400, "viewport is vw,vh (the cropping form vw,vh,sx,sy,sw,sh is not supported)"
            )
        sides = [_number(p, "viewport") for p in parts]
        if any(s != int(s) or not 1 <= s <= MAX_VIEWPORT for s in sides):
            raise RenderError(400, f"viewport sides are whole numbers from 1 to {MAX_VIEWPORT}")
        viewport = (int(sides[0]), int(sides[1]))
    window = None
    if (text := query.get("window")) is not None:
        parts = text.split(",")
        if len(parts) != 3 or parts[2].strip().lower() not in FUNCTIONS:
            raise RenderError(400, f"window is center,width,function ({', '.join(FUNCTIONS)})")
        center, width = _number(parts[0], "window center"), _number(parts[1], "window width")
        function = parts[2].strip().lower()
        if width < (1 if function == "linear" else 0) or width == 0:
            raise RenderError(400, "window width must be at least 1 (above 0 for the others)")
        window = (center, width, function)
    quality = JPEG_QUALITY
    if (text := query.get("quality")) is not None:
        value = _number(text, "quality")
        if value != int(value) or not 1 <= value <= 100:
            raise RenderError(400, "quality is a whole number from 1 to 100")
        quality = int(value)
    return RenderRequest(media_type, viewport, window, quality)


def apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Values windowed to 0..1 (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1)."""
    import numpy as np

    x = values.astype(np.float64)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "linear-exact":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    return np.clip((x - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5, 0.0, 1.0)


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        many = isinstance(value, Sequence) and not isinstance(value, str)
        return float(value[0] if many else value)
    except (TypeError, ValueError, IndexError):
        return None


def _grey(array: np.ndarray, header: Any, window: tuple[float, float, str] | None) -> np.ndarray:
    import numpy as np
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(array, header)
    if window is None:
        center, width = _first(header.get("WindowCenter")), _first(header.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            function = str(header.get("VOILUTFunction", "LINEAR")).lower().replace("_", "-")
            window = (center, width, function if function in FUNCTIONS else "linear")
    if window is not None:
        out = apply_window(values, *window)
    else:
        if "VOILUTSequence" in header:
            values = apply_voi(values, header)
        values = values.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        out = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 1.0 - out
    return np.rint(out * 255.0).astype(np.uint8)


def _colour(array: np.ndarray, header: Any) -> np.ndarray:
    import numpy as np
    from pydicom.pixels import apply_color_lut

    if str(header.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        array = apply_color_lut(array, header)
    if array.dtype == np.uint8:
        return array
    top = float(array.max()) or 1.0
    return np.rint(array.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def _encode(pixels: np.ndarray, request: RenderRequest, longest: int) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels)
    if request.viewport is not None:
        vw, vh = request.viewport
        scale = min(vw / image.width, vh / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    else:
        image.thumbnail((longest, longest), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if request.media_type == "image/png":
        image.save(out, format="PNG")
    else:
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
            out, format="JPEG", quality=request.quality
        )
    return out.getvalue()


class _ImageCache:
    """Encoded images by key, least recently used dropped first, bounded in bytes."""

    def __init__(self, max_bytes: int, max_item: int) -> None:
        self.max_bytes, self.max_item = max_bytes, max_item
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[Any, ...], data: bytes) -> None:
        if len(data) > self.max_item:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


#: Rendered images and thumbnails kept (OHIF asks for the same thumbnails again and again).
CACHE = _ImageCache(max_bytes=32 << 20, max_item=1 << 20)


def _render(path: Path, index: int, request: RenderRequest, longest: int) -> bytes:
    from pydicom.pixels import pixel_array

    header = read_header(path)
    if header is None or "Rows" not in header:
        raise RenderError(404, "this instance has no image (no Pixel Data)")
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if not 0 <= index < frames:
        raise RenderError(404, f"frame {index + 1} is beyond this instance's {frames} frame(s)")
    array = pixel_array(str(path), index=index)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    photometric = str(header.get("PhotometricInterpretation", ""))
    if samples == 1 and photometric != "PALETTE COLOR":
        pixels = _grey(array, header, request.window)
    else:
        pixels = _colour(array, header)
    return _encode(pixels, request, longest)


def render(path: Path, request: RenderRequest, index: int = 0, thumbnail: bool = False) -> bytes:
    """Frame ``index`` of the file at ``path`` drawn as ``request`` asks (see the module
    docstring). Raises :class:`RenderError` (404) for an instance without pixels."""
    longest = THUMBNAIL_SIDE if thumbnail else MAX_SIDE
    key = (path, path.stat().st_mtime_ns, index, request, longest)
    found = CACHE.get(key)
    if found is None:
        found = _render(path, index, request, longest)
        CACHE.put(key, found)
    return found
