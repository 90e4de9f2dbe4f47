"""A node for the DICOMweb tests: ``triage serve``'s components as its command assembles them
(receiver, HTTP server with DICOMweb, and with a model the workers and the delivery thread) in
this process, on loopback ports."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from test_node_support import free_port

from dicom_node.node import Node, build_serve_node
from dicom_node.settings import NodeSettings
from triage_core.worklist import Worklist

TOKEN = "dicomweb-test-token-0123456789"


@dataclass
class RunningNode:
    settings: NodeSettings
    node: Node

    @property
    def worklist(self) -> Worklist:
        return self.node.parts.worklist

    @property
    def base(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}/dicomweb"

    @property
    def storage(self) -> Path:
        return self.settings.storage

    def spool_files(self) -> list[Path]:
        spool = self.storage / "spool"
        return sorted(p for p in spool.rglob("*.dcm") if ".incoming" not in p.parts)

    def incoming(self) -> list[Path]:
        return sorted((self.storage / "spool" / ".incoming").iterdir())

    def quarantined(self) -> list[Path]:
        return sorted((self.storage / "quarantine").glob("*.dcm"))


@contextlib.contextmanager
def running_node(
    storage: Path, model: Path | None = None, **overrides: Any
) -> Iterator[RunningNode]:
    """``triage serve``'s components (:func:`dicom_node.node.build_serve_node`) in this process;
    ``workers = 0`` (nothing processed) unless a ``model`` is given."""
    storage.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("workers", 1 if model is not None else 0)
    overrides.setdefault("stable_age", 0.5)
    overrides.setdefault("port", free_port())
    overrides.setdefault("http_port", free_port())
    settings = NodeSettings(storage=storage, bind_address="127.0.0.1", **overrides)
    node = build_serve_node(settings, model)
    node.start()
    try:
        token = settings.http_token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        if settings.http_proxy_header:
            headers[settings.http_proxy_header] = "health-check"
        deadline = time.monotonic() + 30
        while True:
            try:
                url = f"http://{settings.http_host}:{settings.http_port}/healthz"
                if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.05)
        yield RunningNode(settings, node)
    finally:
        node.stop(10)


def multipart_body(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    """A multipart/related body: ``(content type, bytes)`` per part."""
    out = b""
    for content_type, data in parts:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


#: Shared files a node refuses as they are: an invalid SOP Instance UID, a repeated one.
RENAMED = ("CR-ModalitySequenceLUT.dcm", "Fake_MONOHR1.dcm")


def store_shared(client: Any, dicom_dir: Path) -> dict[str, Any]:
    """Every shared DICOM file stored by STOW-RS through ``client`` (a ``DICOMwebClient``); the
    files of :data:`RENAMED` get fresh SOP Instance and Series UIDs (pixel data unchanged).
    Returns file name -> the data set stored."""
    import pydicom
    from pydicom.uid import generate_uid

    out = {}
    for path in sorted(dicom_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if path.name in RENAMED:
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesInstanceUID = generate_uid()
        out[path.name] = ds
    answer = client.store_instances(list(out.values()))
    assert len(answer.ReferencedSOPSequence) == len(out)
    assert "FailedSOPSequence" not in answer
    return out


def instance_uids(ds: Any) -> tuple[str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
