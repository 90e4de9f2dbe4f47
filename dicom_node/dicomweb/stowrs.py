"""STOW-RS client: send result objects (SR, SC) to a DICOMweb destination (PS3.18 10.5).

A destination is a DICOMweb base URL (``--destination http://host:8042/dicom-web``, or a
``[[destinations]]`` table with ``url``, ``token`` and TLS settings in the TOML file):
:class:`DicomwebDestination`. :func:`send_files` posts every file of one delivery pass in one
``multipart/related; type="application/dicom"`` request to ``{url}/studies`` (files streamed
from disk), with ``Authorization: Bearer`` when a token is set, and reads the Store Instances
Response: each file's outcome is returned as the same
:class:`~dicom_node.net.scu.SendResult` a C-STORE gives, with the STOW-RS Failure Reason as its
status (0xA9xx and 0xCxxx are refusals that cannot change, as for C-STORE). A request refused
as a whole for what it is (400, 413, 415) fails its files the same way; no answer, a server
error (5xx), or a refused token (401, 403) raises :class:`~triage_core.errors.DeliveryError`,
and the delivery is retried with back-off like a C-STORE one. ``httpx`` (imported when a
send happens) does the HTTP, TLS 1.2+ with the system's CAs or ``tls_ca``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dicom_node.destinations import DicomwebDestination, SendResult
from triage_core.errors import DeliveryError

logger = logging.getLogger(__name__)

#: Failure Reason used for a whole request refused for what it is (400, 413, 415).
CANNOT_UNDERSTAND = 0xC000
_CHUNK = 1 << 20


def _body(paths: Sequence[Path], boundary: str) -> tuple[int, Iterator[bytes]]:
    """The multipart/related body: its length (sent as Content-Length: Orthanc 1.10 does not
    read chunked request bodies) and its pieces, each file read from disk in 1 MiB chunks."""
    heads = [
        (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n"
            f"Content-Length: {path.stat().st_size}\r\n\r\n"
        ).encode("ascii")
        for path in paths
    ]
    tail = f"--{boundary}--\r\n".encode("ascii")
    length = sum(len(h) + p.stat().st_size + 2 for h, p in zip(heads, paths, strict=True))

    def pieces() -> Iterator[bytes]:
        for head, path in zip(heads, paths, strict=True):
            yield head
            fd = os.open(path, os.O_RDONLY)
            try:
                while chunk := os.read(fd, _CHUNK):
                    yield chunk
            finally:
                os.close(fd)
            yield b"\r\n"
        yield tail

    return length + len(tail), pieces()


def _verify(destination: DicomwebDestination) -> Any:
    """httpx's ``verify``: an SSL context (TLS 1.2+; ``tls_ca`` or the system CAs)."""
    import ssl

    try:
        context = ssl.create_default_context(
            cafile=str(destination.tls_ca) if destination.tls_ca else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if destination.tls_cert is not None and destination.tls_key is not None:
            context.load_cert_chain(str(destination.tls_cert), str(destination.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"{destination}: TLS files cannot be loaded: {exc}") from exc
    return context


def _sop_uids(paths: Sequence[Path]) -> list[str]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    uids = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except (OSError, InvalidDicomError, ValueError) as exc:
            raise DeliveryError(f"{path}: cannot be read for sending: {exc}") from exc
        uids.append(str(ds.SOPInstanceUID))
    return uids


def _outcomes(paths: Sequence[Path], uids: Sequence[str], answer: Any) -> list[SendResult]:
    """Each file's outcome from a Store Instances Response (DICOM JSON)."""

    def items(tag: str) -> list[dict[str, Any]]:
        element = answer.get(tag, {}) if isinstance(answer, dict) else {}
        value = element.get("Value", []) if isinstance(element, dict) else []
        return [v for v in value if isinstance(v, dict)]

    def uid_of(item: dict[str, Any]) -> str:
        value = item.get("00081155", {}).get("Value", [""])
        return str(value[0]) if value else ""

    referenced = {uid_of(i) for i in items("00081199")}
    failed: dict[str, int] = {}
    for item in items("00081198"):
        reason = item.get("00081197", {}).get("Value", [CANNOT_UNDERSTAND])
        failed[uid_of(item)] = int(reason[0]) if reason else CANNOT_UNDERSTAND
    results = []
    for path, uid in zip(paths, uids, strict=True):
        if uid in failed:
            code = failed[uid]
            results.append(SendResult(path, code, False, f"refused: Failure Reason 0x{code:04X}"))
        elif uid in referenced:
            results.append(SendResult(path, 0, True, "stored"))
        else:
            results.append(SendResult(path, None, False, "not in the Store Instances Response"))
    return results


def send_files(
    destination: DicomwebDestination, paths: Sequence[Path], *, timeout: float = 30.0
) -> list[SendResult]:
    """Store ``paths`` at ``destination`` in one STOW-RS request (see the module docstring).

    Raises
    ------
    DeliveryError
        A file cannot be read, the TLS files cannot be loaded, or the server does not answer,
        answers 5xx or refuses the token (the delivery is retried).
    """
    import httpx

    if not paths:
        return []
    uids = _sop_uids(paths)
    boundary = f"cxr-triage-{uuid.uuid4().hex}"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    verify = _verify(destination) if destination.url.startswith("https://") else True
    url = f"{destination.url}/studies"
    try:
        length, pieces = _body(paths, boundary)
        headers["Content-Length"] = str(length)
        with httpx.Client(timeout=timeout, verify=verify, follow_redirects=False) as client:
            rsp = client.post(url, content=pieces, headers=headers)
    except (httpx.HTTPError, OSError) as exc:
        raise DeliveryError(f"{destination}: no STOW-RS answer: {exc}") from exc
    if rsp.status_code in (200, 202, 409):
        try:
            answer = rsp.json() if rsp.content else {}
        except ValueError:
            answer = {}
        results = _outcomes(paths, uids, answer)
        if rsp.status_code == 200 and not answer:  # a server that answers 200 without a body
            results = [SendResult(p, 0, True, "stored") for p in paths]
    elif rsp.status_code in (400, 413, 415):
        why = f"refused with HTTP {rsp.status_code}: {rsp.text[:200]}"
        results = [SendResult(p, CANNOT_UNDERSTAND, False, why) for p in paths]
    else:
        raise DeliveryError(f"{destination}: STOW-RS answered HTTP {rsp.status_code}")
    for result in results:
        log = logger.info if result.ok else logger.warning
        log("STOW-RS %s -> %s: %s", result.path.name, destination, result.message)
    return results
