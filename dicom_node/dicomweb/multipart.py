"""multipart/related for DICOMweb (RFC 2387, PS3.18 8.6.1.2): media types, a parser, a writer.

Parsing uses the ``multipart`` package's :class:`multipart.PushMultipartParser`: a push parser
(we feed it the chunks of the request body as they arrive; it never holds a part whole) that
bounds every length it reads (header line, headers per part, part size, number of parts) and
raises a :class:`multipart.MultipartError` on anything malformed. Its only form-data specific
step is the ``Content-Disposition`` check in ``_create_segment``, the documented hook for other
multipart types; :class:`RelatedParser` overrides it for multipart/related. Starlette's own
parser (``python-multipart`` underneath) handles only multipart/form-data and
x-www-form-urlencoded bodies, and spools form files rather than handing us the stream.

:func:`parse_media_type` reads a ``Content-Type`` or one ``Accept`` entry;
:func:`multipart_chunks` writes a multipart/related body part by part (files read in chunks).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import multipart

#: Most bytes of one part header line, and header lines per part (DICOMweb parts carry two or
#: three: Content-Type, Content-Length, Content-Location).
MAX_HEADER_LINE = 4096
MAX_HEADERS = 16
#: Longest boundary accepted. RFC 2046 allows 70 characters, but Orthanc's DICOMweb plugin
#: (1.7) sends 73 (two UUIDs joined by a dash), so a little more is taken.
MAX_BOUNDARY = 200
#: Bytes read from a file per chunk of a response body.
READ_CHUNK = 1 << 20


class MediaTypeError(ValueError):
    """A Content-Type or Accept value we cannot use (the message says why)."""


@dataclass(frozen=True)
class MediaType:
    """A media type with its parameters (names lower-cased, quotes removed)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    def param(self, name: str, default: str = "") -> str:
        return self.params.get(name, default)


def _split_params(text: str) -> list[str]:
    """Split on ``;`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == ";" and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_media_type(text: str) -> MediaType:
    """``multipart/related; type="application/dicom"; boundary=x`` -> :class:`MediaType`.

    Raises
    ------
    MediaTypeError
        Empty, or longer than 1024 characters, or a parameter without ``=``.
    """
    if not text or len(text) > 1024:
        raise MediaTypeError("missing or overlong media type")
    head, *rest = _split_params(text)
    params: dict[str, str] = {}
    for item in rest:
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise MediaTypeError(f"media type parameter {item.strip()!r} has no value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        params[name.strip().lower()] = value
    return MediaType(head.strip().lower(), params)


def parse_accept(text: str | None) -> list[MediaType]:
    """The entries of an ``Accept`` header (empty list: none given), without ``q`` ordering
    (PS3.18 clients list what they accept; the first we can give wins)."""
    if not text or not text.strip():
        return []
    if len(text) > 4096:
        raise MediaTypeError("overlong Accept header")
    out = []
    depth = 0
    start = 0
    entries = []
    for i, char in enumerate(text):
        if char == '"':
            depth ^= 1
        elif char == "," and not depth:
            entries.append(text[start:i])
            start = i + 1
    entries.append(text[start:])
    for entry in entries:
        if entry.strip():
            out.append(parse_media_type(entry))
    return out


def related_boundary(media: MediaType) -> str:
    """The boundary of a multipart/related body (checked: present, RFC 2046 characters)."""
    boundary = media.param("boundary")
    if not boundary:
        raise MediaTypeError("multipart/related without a boundary parameter")
    if len(boundary) > MAX_BOUNDARY or any(ord(c) < 0x20 or ord(c) > 0x7E for c in boundary):
        raise MediaTypeError(
            f"boundary longer than {MAX_BOUNDARY} characters or not printable ASCII"
        )
    return boundary


class RelatedParser(multipart.PushMultipartParser):
    """:class:`multipart.PushMultipartParser` for multipart/related: parts carry no
    ``Content-Disposition`` (the one step of the parent that is specific to form-data)."""

    def _create_segment(self, headerlist: list[tuple[str, str]]) -> multipart.MultipartSegment:
        return multipart.MultipartSegment(headerlist)


def new_boundary() -> str:
    return f"cxr-triage-{uuid.uuid4().hex}"


def related_content_type(boundary: str, part_type: str) -> str:
    """The response's ``Content-Type`` (PS3.18 8.7.3.1)."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def multipart_chunks(
    parts: Iterable[tuple[str, Path | bytes, str]], boundary: str
) -> Iterator[bytes]:
    """A multipart/related body: ``(content_type, file or bytes, content_location)`` per part.

    Files are read in :data:`READ_CHUNK` pieces; one that vanished since the listing (purged)
    is left out rather than failing the whole response halfway.
    """
    for content_type, body, location in parts:
        head = f"--{boundary}\r\nContent-Type: {content_type}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        if isinstance(body, bytes):
            yield f"{head}Content-Length: {len(body)}\r\n\r\n".encode("ascii")
            yield body
        else:
            try:
                fd = os.open(body, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                size = os.fstat(fd).st_size
                yield f"{head}Content-Length: {size}\r\n\r\n".encode("ascii")
                while chunk := os.read(fd, READ_CHUNK):
                    yield chunk
            finally:
                os.close(fd)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")
