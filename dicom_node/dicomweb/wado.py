"""WADO-RS (PS3.18 10.4): instances, metadata, bulk data and rendered images.

- **Instances** of a study, a series or one instance: ``multipart/related;
  type="application/dicom"``, each part a stored file streamed from disk in its stored transfer
  syntax (also for an ``Accept`` without a ``transfer-syntax`` parameter, and for
  ``transfer-syntax=*``). A request for Explicit VR Little Endian gets files stored compressed
  decoded to it; any other transfer syntax that is not the stored one is answered 406. An
  instance can also be asked for as plain ``application/dicom`` (one file, no multipart).
- **Metadata**: ``application/dicom+json``, every attribute of each header, bulk data
  (elements over :data:`~dicom_node.dicomweb.catalog.BULK_THRESHOLD` bytes and Pixel
  Data) by ``BulkDataURI``.
- **Bulk data** of a top-level element: ``multipart/related; type="application/octet-stream"``
  (Pixel Data uncompressed, little endian).
- **Frames**, **rendered** images and **thumbnails**: :mod:`~dicom_node.dicomweb.frames`
  and :mod:`~dicom_node.dicomweb.rendering` (routes in :mod:`~dicom_node.dicomweb.pixels`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from dicom_node.dicomweb.catalog import ENCAPSULATED_PREFIXES, Entry, nested_value, read_header
from dicom_node.dicomweb.multipart import (
    MediaType,
    multipart_chunks,
    new_boundary,
    related_content_type,
)

logger = logging.getLogger(__name__)

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


class NotAcceptable(ValueError):
    """No media type or transfer syntax of the ``Accept`` header can be given (406)."""


def _dicom_accept(accept: Sequence[MediaType]) -> tuple[str | None, bool]:
    """The transfer syntax asked for (``None``: as stored) and whether a single part (plain
    ``application/dicom``) was asked for. Raises :class:`NotAcceptable`."""
    if not accept:
        return None, False
    reasons = []
    for media in accept:
        if media.type in ("*/*", "multipart/*"):
            return None, False
        part_type = media.param("type", "application/dicom").lower()
        if media.type == "multipart/related" and part_type in ("application/dicom", "*/*"):
            syntax = media.param("transfer-syntax", "*")
            return (None if syntax == "*" else syntax), False
        if media.type == "application/dicom":
            syntax = media.param("transfer-syntax", "*")
            return (None if syntax == "*" else syntax), True
        reasons.append(media.type if media.type != "multipart/related" else part_type)
    raise NotAcceptable(
        f"cannot give {', '.join(reasons)}: instances are given as multipart/related; "
        'type="application/dicom"'
    )


def negotiate(accept: Sequence[MediaType], entries: Sequence[Entry]) -> tuple[str | None, bool]:
    """Check that every file can be given as asked; returns (transfer syntax, single part)."""
    syntax, single = _dicom_accept(accept)
    if syntax is None or syntax == EXPLICIT_VR_LE:
        return syntax, single
    for entry in entries:
        header = read_header(entry.path)
        stored = str(header.file_meta.get("TransferSyntaxUID", "")) if header is not None else ""
        if stored != syntax:
            raise NotAcceptable(
                f"transfer syntax {syntax} cannot be given for {entry.sop_uid} (stored as "
                f"{stored}); ask for * (as stored) or {EXPLICIT_VR_LE}"
            )
    return syntax, single


def transcoded(path: Path, syntax: str) -> bytes | None:
    """The file in ``syntax`` (Explicit VR Little Endian only), or ``None`` if stored so."""
    import pydicom

    header = read_header(path)
    if header is None:
        return None
    stored = str(header.file_meta.get("TransferSyntaxUID", ""))
    if stored == syntax:
        return None
    ds = pydicom.dcmread(path)
    if stored.startswith(ENCAPSULATED_PREFIXES):
        ds.decompress()  # to Explicit VR Little Endian (pylibjpeg's plugins decode)
    else:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def instance_parts(
    entries: Sequence[Entry], syntax: str | None, base: str
) -> tuple[str, Iterator[bytes]]:
    """The multipart/related body of ``entries``: its content type and its chunks."""
    boundary = new_boundary()

    def parts() -> Iterator[tuple[str, Path | bytes, str]]:
        for entry in entries:
            header = read_header(entry.path)
            if header is None:
                continue  # purged since the listing
            stored = str(header.file_meta.get("TransferSyntaxUID", ""))
            body: Path | bytes = entry.path
            given = stored
            if syntax is not None and syntax != stored:
                data = transcoded(entry.path, syntax)
                if data is not None:
                    body, given = data, syntax
            location = (
                f"{base}/studies/{entry.study_uid}/series/{entry.series_uid}/instances/"
                f"{entry.sop_uid}"
            )
            yield f"application/dicom; transfer-syntax={given}", body, location

    return related_content_type(boundary, "application/dicom"), multipart_chunks(parts(), boundary)


def bulk_value(path: Path, where: list[int]) -> bytes | None:
    """The bytes of the element at ``where`` (:func:`~dicom_node.dicomweb.catalog.
    parse_bulk_path`), ``None`` if absent. Pixel Data is given uncompressed (decoded whole:
    viewers ask for frames instead); any other element comes from the cached header."""
    import pydicom

    if where != [0x7FE00010]:
        header = read_header(path)
        return None if header is None else nested_value(header, where)
    ds = pydicom.dcmread(path)
    if 0x7FE00010 not in ds:
        return None
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax.startswith(ENCAPSULATED_PREFIXES):
        ds.decompress()
    return bytes(ds.PixelData)


def bulk_parts(data: bytes) -> tuple[str, Iterator[bytes]]:
    boundary = new_boundary()
    return related_content_type(boundary, "application/octet-stream"), multipart_chunks(
        [("application/octet-stream", data, "")], boundary
    )
