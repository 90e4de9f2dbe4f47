"""WADO-RS frames (PS3.18 10.4.1.1.4 and 8.7.3): ``.../instances/{sop}/frames/{list}``.

A frame list is one or more frame numbers (1-based, comma-separated, in the order wanted,
repeats allowed), at most :data:`MAX_FRAMES` of them; a list that is not such a list is 400, a
number beyond the instance's Number of Frames is 404, an instance without Pixel Data is 404.

The answer is ``multipart/related``, one part per frame, chosen from the ``Accept`` entries in
the order given (the first we can give wins; none: 406 naming the stored syntax):

=============================================================  ==============================
``Accept`` entry                                               each part
=============================================================  ==============================
``multipart/related; type="application/octet-stream";          the frame as stored: the
transfer-syntax=*`` (what OHIF sends), ``type="*/*"``,         compressed bitstream unchanged,
``*/*``, or ``transfer-syntax=`` the stored syntax             or the native pixel bytes
``multipart/related; type="application/octet-stream"``         the frame decoded to Explicit
(no ``transfer-syntax``: its default), or with                 VR Little Endian (native
``transfer-syntax=1.2.840.10008.1.2.1``                        bytes as stored if native LE)
``multipart/related; type="image/jpeg"`` (``image/jls``,       the stored bitstream, when the
``image/jp2``, ``image/jpx``, ``image/dicom-rle``), with no    stored syntax is one of that
``transfer-syntax``, ``*`` or the stored one                   media type's (PS3.18 Table
                                                               8.7.3-2)
=============================================================  ==============================

Each part's ``Content-Type`` names what it holds: ``application/octet-stream;
transfer-syntax=UID`` (or the image media type asked for, with its ``transfer-syntax``).

Bounded: frames are read one at a time from the stored file and handed to the response writer
before the next is read. A compressed frame is read with :func:`pydicom.encaps.get_frame` from
the file positioned at the Pixel Data value (the Basic or Extended Offset Table is used; only
that frame's fragments are read); a native frame is one ``seek`` and one ``read``; a frame to
decode is decoded alone by :func:`pydicom.pixels.pixel_array` (``index=``), which reads only
that frame's data. So a request holds at most one frame (and its decoded array) beside the
bytes being written, whatever the number of frames asked for or stored. (The one exception: a
file stored in Deflated Explicit VR Little Endian has no offsets to seek to; it is inflated
whole and its frames given decoded.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.dicomweb.catalog import ENCAPSULATED_PREFIXES, read_header
from dicom_node.dicomweb.multipart import MediaType, multipart_chunks, new_boundary

logger = logging.getLogger(__name__)

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
OCTET_STREAM = "application/octet-stream"
#: Most frame numbers in one request, and most characters of the list.
MAX_FRAMES = 512
MAX_LIST_CHARS = 8 * MAX_FRAMES
#: The compressed transfer syntaxes and their media types (PS3.18 Table 8.7.3-2).
IMAGE_MEDIA_TYPES: dict[str, frozenset[str]] = {
    "1.2.840.10008.1.2.4.50": frozenset({"image/jpeg"}),
    "1.2.840.10008.1.2.4.51": frozenset({"image/jpeg"}),
    "1.2.840.10008.1.2.4.57": frozenset({"image/jpeg"}),
    "1.2.840.10008.1.2.4.70": frozenset({"image/jpeg"}),
    "1.2.840.10008.1.2.4.80": frozenset({"image/jls", "image/x-jls"}),
    "1.2.840.10008.1.2.4.81": frozenset({"image/jls", "image/x-jls"}),
    "1.2.840.10008.1.2.4.90": frozenset({"image/jp2"}),
    "1.2.840.10008.1.2.4.91": frozenset({"image/jp2"}),
    "1.2.840.10008.1.2.4.92": frozenset({"image/jpx"}),
    "1.2.840.10008.1.2.4.93": frozenset({"image/jpx"}),
    "1.2.840.10008.1.2.5": frozenset({"image/dicom-rle", "image/x-dicom-rle"}),
}
_ANY = ("*/*", "*", "multipart/*")


class FrameRequestError(ValueError):
    """A frame list we refuse: ``status`` 400 (malformed, too long) or 404 (no such frame)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NotAcceptable(ValueError):
    """No ``Accept`` entry can be given for this instance's frames (406)."""


def parse_frame_list(text: str, number_of_frames: int) -> list[int]:
    """``"1,3,2"`` -> ``[0, 2, 1]`` (0-based indices in the order asked).

    Raises
    ------
    FrameRequestError
        400 for anything but positive decimal numbers separated by commas, or more than
        :data:`MAX_FRAMES` of them; 404 for a number over ``number_of_frames``.
    """
    if not text or len(text) > MAX_LIST_CHARS:
        raise FrameRequestError(400, f"a frame list has 1 to {MAX_FRAMES} frame numbers")
    items = text.split(",")
    if len(items) > MAX_FRAMES:
        raise FrameRequestError(400, f"at most {MAX_FRAMES} frames per request")
    out = []
    for item in items:
        item = item.strip()
        if not item.isdecimal() or not item.isascii() or len(item) > 9 or int(item) < 1:
            raise FrameRequestError(
                400, f"frame number {item[:20]!r} is not a positive integer (frames count from 1)"
            )
        number = int(item)
        if number > number_of_frames:
            raise FrameRequestError(
                404, f"frame {number} is beyond this instance's {number_of_frames} frame(s)"
            )
        out.append(number - 1)
    return out


@dataclass(frozen=True)
class PixelSource:
    """Where an instance's frames lie in its file and how they are encoded."""

    path: Path
    syntax: str
    number_of_frames: int
    frame_size: int  # bytes of one native frame (0: encapsulated, or bits packed)
    value_offset: int  # file offset of the Pixel Data value (-1: not seekable)
    extended_offsets: tuple[bytes, bytes] | None

    @property
    def encapsulated(self) -> bool:
        return self.syntax.startswith(ENCAPSULATED_PREFIXES)

    @property
    def native_le(self) -> bool:
        return self.syntax in (EXPLICIT_VR_LE, IMPLICIT_VR_LE) and self.frame_size > 0


def pixel_source(path: Path) -> PixelSource | None:
    """The frames of the file at ``path``; ``None`` when it has no Pixel Data (or is gone)."""
    import pydicom

    header = read_header(path)
    if header is None or "Rows" not in header:
        return None
    syntax = str(header.file_meta.get("TransferSyntaxUID", ""))
    frames = int(header.get("NumberOfFrames", 1) or 1)
    rows, cols = int(header.Rows), int(header.Columns)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    allocated = int(header.get("BitsAllocated", 16) or 16)
    frame_size = rows * cols * samples * allocated // 8 if allocated % 8 == 0 else 0
    offset = -1
    if syntax != DEFLATED:
        # A lazy read: Pixel Data stays unread, its position recorded (pydicom's deferred read).
        ds = pydicom.dcmread(path, defer_size=256)
        raw = ds.get_item(0x7FE00010, keep_deferred=True)
        if raw is None:
            return None
        offset = int(getattr(raw, "value_tell", -1))
    extended = None
    if "ExtendedOffsetTable" in header and "ExtendedOffsetTableLengths" in header:
        extended = (bytes(header.ExtendedOffsetTable), bytes(header.ExtendedOffsetTableLengths))
    return PixelSource(path, syntax, frames, frame_size, offset, extended)


@dataclass(frozen=True)
class FramePlan:
    """What the parts carry: the stored frames or decoded ones, and their Content-Type."""

    decode: bool
    part_type: str


def choose(accept: Sequence[MediaType], source: PixelSource) -> FramePlan:
    """The first ``Accept`` entry we can give (see the module docstring); no entry: as the
    default media type, ``application/octet-stream`` in Explicit VR Little Endian.

    Raises
    ------
    NotAcceptable
        No entry can be given; the message names the stored syntax and what would do.
    """
    stored = source.syntax
    seekable = source.value_offset >= 0
    image_types = IMAGE_MEDIA_TYPES.get(stored, frozenset())
    evle = FramePlan(not source.native_le, f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LE}")
    if source.native_le:
        as_stored = evle
    elif seekable and (source.encapsulated or source.frame_size > 0):
        as_stored = FramePlan(False, f"{OCTET_STREAM}; transfer-syntax={stored}")
    else:
        as_stored = evle  # deflated or bit-packed: decoded is what we give
    if not accept:
        return evle
    for media in accept:
        if media.type in _ANY:
            return _labelled(as_stored, image_types, stored)
        if media.type != "multipart/related":
            continue
        part = media.param("type", OCTET_STREAM).lower()
        syntax = media.param("transfer-syntax")
        if part in _ANY:
            if syntax in ("", "*", stored):
                return _labelled(as_stored, image_types, stored)
            if syntax == EXPLICIT_VR_LE:
                return evle
        elif part == OCTET_STREAM:
            if syntax in ("*", stored):
                return as_stored
            if syntax in ("", EXPLICIT_VR_LE):
                return evle
        elif part in image_types and syntax in ("", "*", stored) and not as_stored.decode:
            return FramePlan(False, f"{part}; transfer-syntax={stored}")
    raise NotAcceptable(
        f"the frames are stored as {stored}: ask for multipart/related; "
        f'type="{OCTET_STREAM}" with transfer-syntax=* (as stored) or {EXPLICIT_VR_LE}'
        + (f', or type="{sorted(image_types)[0]}"' if image_types else "")
    )


def _labelled(plan: FramePlan, image_types: frozenset[str], stored: str) -> FramePlan:
    """``*/*``: a compressed frame is labelled with its image media type."""
    if plan.decode or not image_types:
        return plan
    return FramePlan(False, f"{sorted(image_types)[0]}; transfer-syntax={stored}")


def stored_frame(source: PixelSource, index: int) -> bytes:
    """Frame ``index`` (0-based) as stored: one compressed frame's bitstream, read with
    pydicom's fragment helpers, or one native frame's bytes."""
    from pydicom.encaps import get_frame

    with open(source.path, "rb") as fp:
        fp.seek(source.value_offset)
        if source.encapsulated:
            return get_frame(
                fp,
                index,
                number_of_frames=source.number_of_frames,
                extended_offsets=source.extended_offsets,
            )
        fp.seek(source.value_offset + index * source.frame_size)
        data = fp.read(source.frame_size)
    if len(data) != source.frame_size:
        raise ValueError(f"the Pixel Data ends before frame {index + 1}")
    return data


def decoded_frame(source: PixelSource, index: int) -> bytes:
    """Frame ``index`` decoded (pydicom's decoders, as ``Dataset.pixel_array`` gives it) as
    Explicit VR Little Endian pixel bytes (bit-packed again for Bits Allocated 1)."""
    import numpy as np
    from pydicom.pixels import pack_bits, pixel_array

    if source.value_offset < 0:  # deflated: no offset into the file, so inflated whole
        import pydicom

        array = pixel_array(pydicom.dcmread(source.path), index=index)
    else:
        array = pixel_array(str(source.path), index=index)
    header = read_header(source.path)
    if header is not None and int(header.get("BitsAllocated", 8) or 8) == 1:
        return pack_bits(array)
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()


def frame_parts(
    source: PixelSource, indices: Sequence[int], plan: FramePlan
) -> Iterator[tuple[str, Path | bytes, str]]:
    """The parts of the answer, one frame read (or decoded) at a time."""
    read = decoded_frame if plan.decode else stored_frame
    for index in indices:
        yield plan.part_type, read(source, index), ""


def frames_response(
    source: PixelSource, indices: Sequence[int], plan: FramePlan
) -> tuple[str, Iterator[bytes]]:
    """The ``Content-Type`` of the answer and its body's chunks (streamed)."""
    boundary = new_boundary()
    part = plan.part_type.split(";", 1)[0]
    content_type = f'multipart/related; type="{part}"; boundary={boundary}'
    return content_type, multipart_chunks(frame_parts(source, indices, plan), boundary)
