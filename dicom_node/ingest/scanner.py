"""Structural scan of a received data set, without decoding it.

:func:`scan_dataset` walks the element headers of an encoded data set (values are skipped by
length, so a 10 MB image costs what a small one does) to prove the stream is complete and to
pick the few values the receive path needs (:class:`HeaderInfo`). Ours rather than pydicom's
reader: pydicom parses lazily and tolerates truncation (a stream cut at an element boundary
reads as a shorter, valid data set), and decoding every element costs ~100x more per C-STORE.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from triage_core.errors import ImageReadError, TruncatedFileError

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

# Explicit-VR VRs with a reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
#: Folder below the spool for instances being received (not a UID: no study can collide).
_ITEM = (0xFFFE, 0xE000)
_ITEM_DELIM = (0xFFFE, 0xE00D)
_SEQ_DELIM = (0xFFFE, 0xE0DD)
_MAX_DEPTH = 16

#: Single-image storage classes that must carry Pixel Data (a stream cut at an element boundary
#: otherwise looks complete): CR, DX, MG, IO (presentation and processing), SC, CT, MR, US, XA.
IMAGE_STORAGE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.1.3",
        "1.2.840.10008.5.1.4.1.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.12.1",
    }
)

_WANTED = {
    (0x0008, 0x0016): "sop_class_uid",
    (0x0008, 0x0018): "sop_instance_uid",
    (0x0008, 0x0050): "accession_number",
    (0x0008, 0x0060): "modality",
    (0x0010, 0x0020): "patient_id",
    (0x0020, 0x000D): "study_uid",
    (0x0020, 0x000E): "series_uid",
}


@dataclass(frozen=True)
class HeaderInfo:
    """What the receive path needs from a dataset, found without decoding it."""

    study_uid: str = ""
    series_uid: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    accession_number: str = ""
    patient_id: str = ""


class _Scanner:
    """Walk a DICOM data set's elements to prove it is complete and to pick a few values."""

    def __init__(self, data: bytes | memoryview, implicit: bool, little: bool) -> None:
        self.data = memoryview(data)
        self.end = len(data)
        self.implicit = implicit
        self.prefix = "<" if little else ">"
        # precompiled: explicit short header (tag, VR, 2-byte length), tag + 4-byte length
        self._short = struct.Struct(self.prefix + "HH2sH")
        self._implicit = struct.Struct(self.prefix + "HHI")
        self._u32 = struct.Struct(self.prefix + "I")
        self.values: dict[str, str] = {}
        self.has_pixels = False

    def _need(self, pos: int, count: int, what: str) -> None:
        if pos + count > self.end:
            raise TruncatedFileError(
                "C-STORE data set",
                f"stream ends at byte {self.end} inside {what} (needs {pos + count})",
            )

    def _item_header(self, pos: int, what: str) -> tuple[tuple[int, int], int]:
        """The tag and 4-byte length of an item or delimiter at ``pos`` (8 bytes)."""
        self._need(pos, 8, what)
        group, elem, length = self._implicit.unpack_from(self.data, pos)
        return (group, elem), length

    def walk(self, pos: int, stop: int, depth: int, implicit: bool, top: bool) -> int:
        """Walk elements from ``pos``; return the offset after the last one.

        ``stop`` is the end of a defined-length container, or -1 for an undefined-length item
        (ends at an item delimiter, whose offset after is returned).
        """
        if depth > _MAX_DEPTH:
            raise ImageReadError("C-STORE data set", f"sequences nested deeper than {_MAX_DEPTH}")
        limit = self.end if stop < 0 else stop
        end = self.end
        data = self.data
        short = self._short
        implicit_header = self._implicit
        u32 = self._u32
        last_tag = (-1, -1)
        while pos < limit:
            if pos + 8 > end:  # every element header and delimiter is at least 8 bytes
                self._need(pos, 8, "an element header")
            if implicit:
                group, elem, length = implicit_header.unpack_from(data, pos)
                vr = b""
                header = 8
            else:
                group, elem, vr, length = short.unpack_from(data, pos)
                header = 8
            tag = (group, elem)
            if group == 0xFFFE:
                if tag == _ITEM_DELIM:
                    if stop >= 0:
                        raise ImageReadError(
                            "C-STORE data set", f"unexpected item delimiter at byte {pos}"
                        )
                    return pos + 8
                raise ImageReadError("C-STORE data set", f"unexpected {tag} at byte {pos}")
            if top:
                if tag <= last_tag:
                    raise ImageReadError(
                        "C-STORE data set",
                        f"element ({group:04X},{elem:04X}) out of order at byte {pos}",
                    )
                last_tag = tag
            if not implicit:
                if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise ImageReadError("C-STORE data set", f"invalid VR {vr!r} at byte {pos + 4}")
                if vr in _LONG_VRS:
                    self._need(pos, 12, "an element header")
                    (length,) = u32.unpack_from(data, pos + 8)
                    header = 12
            pos += header
            if top and tag == (0x7FE0, 0x0010):
                self.has_pixels = True
            if length == _UNDEFINED:
                if tag == (0x7FE0, 0x0010) and top:
                    pos = self._fragments(pos)
                elif implicit or vr in (b"SQ", b"UN"):
                    # UN with undefined length is an implicit-VR sequence (CP-246)
                    pos = self._sequence(pos, depth + 1, implicit or vr == b"UN")
                elif vr in (b"OB", b"OW"):
                    pos = self._fragments(pos)
                else:
                    raise ImageReadError(
                        "C-STORE data set",
                        f"undefined length for VR {vr.decode('ascii')} at byte {pos}",
                    )
                continue
            if pos + length > end:
                self._need(pos, length, f"element ({group:04X},{elem:04X}) of {length} bytes")
            if top and tag in _WANTED:
                raw = bytes(data[pos : pos + length])
                self.values[_WANTED[tag]] = raw.decode("latin-1").strip("\x00 ")
            elif vr == b"SQ":
                self.walk_items(pos, pos + length, depth + 1, implicit)
            pos += length
        if stop < 0:
            raise TruncatedFileError("C-STORE data set", "stream ends before an item delimiter")
        if pos != limit:
            raise ImageReadError("C-STORE data set", f"element overruns its container at {pos}")
        return pos

    def walk_items(self, pos: int, stop: int, depth: int, implicit: bool) -> None:
        """Defined-length sequence: items up to ``stop``."""
        while pos < stop:
            tag, length = self._item_header(pos, "an item header")
            if tag != _ITEM:
                raise ImageReadError("C-STORE data set", f"expected an item at byte {pos}")
            pos += 8
            if length == _UNDEFINED:
                pos = self.walk(pos, -1, depth, implicit, False)
            else:
                self._need(pos, length, "an item")
                self.walk(pos, pos + length, depth, implicit, False)
                pos += length
        if pos != stop:
            raise ImageReadError("C-STORE data set", "sequence items overrun their sequence")

    def _sequence(self, pos: int, depth: int, implicit: bool) -> int:
        """Undefined-length sequence: items until the sequence delimiter."""
        while True:
            tag, length = self._item_header(pos, "an item header")
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM:
                raise ImageReadError("C-STORE data set", f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.walk(pos, -1, depth, implicit, False)
            else:
                self._need(pos, length, "an item")
                self.walk(pos, pos + length, depth, implicit, False)
                pos += length

    def _fragments(self, pos: int) -> int:
        """Encapsulated pixel data: items (offset table, fragments) until the delimiter."""
        while True:
            tag, length = self._item_header(pos, "a pixel data fragment header")
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise ImageReadError(
                    "C-STORE data set", f"bad encapsulated pixel data item at byte {pos - 8}"
                )
            self._need(pos, length, "a pixel data fragment")
            pos += length


def scan_dataset(data: bytes | memoryview, transfer_syntax: str) -> HeaderInfo:
    """Check the structure of an encoded data set and return its identifying values.

    Only element headers are read (values are skipped by length), so a 10 MB image costs the
    same as a small one. Nested sequences are walked too.

    Raises
    ------
    TruncatedFileError
        The stream ends inside an element, an item or the encapsulated pixel data.
    ImageReadError
        Anything else that is not a well-formed data set (invalid VR, bad items, out-of-order
        top-level tags, undecompressable deflate stream).
    """
    if transfer_syntax == DEFLATED_LE:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(bytes(data)) + inflater.flush()
        except zlib.error as exc:
            raise ImageReadError("C-STORE data set", f"deflate stream is corrupt: {exc}") from exc
        if not inflater.eof:
            raise TruncatedFileError("C-STORE data set", "deflate stream ends early")
    implicit = transfer_syntax == IMPLICIT_VR_LE
    little = transfer_syntax != EXPLICIT_VR_BE
    if len(data) < 8:
        raise TruncatedFileError("C-STORE data set", f"only {len(data)} bytes")
    scanner = _Scanner(data, implicit, little)
    scanner.walk(0, len(data), 0, implicit, True)
    info = HeaderInfo(**scanner.values)
    if info.sop_class_uid in IMAGE_STORAGE_CLASSES and not scanner.has_pixels:
        raise TruncatedFileError("C-STORE data set", "image data set without Pixel Data")
    return info
