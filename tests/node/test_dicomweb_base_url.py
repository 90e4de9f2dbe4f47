"""``dicomweb_base_url``: the URLs a node behind a reverse proxy answers with.

A real HTTP hop stands in front of the node: a small forwarding proxy (``http.server``) that
maps ``/cxr/dicomweb/...`` on its own port to the node's ``/dicomweb/...``, as a hospital's
reverse proxy would. dicomweb-client talks to the proxy only; the Retrieve URLs of STOW-RS and
QIDO-RS answers and the BulkDataURIs of metadata must name the proxy and resolve through it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pydantic
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_support import running_node
from test_node_support import synthetic_cr

from dicom_node.settings import NodeSettings

PREFIX = "/cxr/dicomweb"
FORWARDED = ("accept", "content-type", "authorization")


class Proxy:
    """Where the proxy listens (``url``) and where it forwards to (``upstream``, set once the
    node behind it has started: the node needs the proxy's URL in its settings first)."""

    url = ""
    upstream = ""


@contextlib.contextmanager
def reverse_proxy() -> Iterator[Proxy]:
    """``http://127.0.0.1:PORT/cxr/dicomweb`` forwarding to ``Proxy.upstream``."""
    proxy = Proxy()

    class Forward(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            if not self.path.startswith(PREFIX + "/") and self.path != PREFIX:
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED}
            rsp = httpx.request(
                self.command,
                proxy.upstream + self.path.removeprefix(PREFIX),
                content=body,
                headers=headers,
                timeout=120,
            )
            self.send_response(rsp.status_code)
            for name in ("content-type", "warning"):
                if name in rsp.headers:
                    self.send_header(name, rsp.headers[name])
            self.send_header("Content-Length", str(len(rsp.content)))
            self.end_headers()
            self.wfile.write(rsp.content)

        do_GET = do_POST = _forward

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proxy.url = f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"
        yield proxy
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("", ""),
        ("https://proxy.example.org/cxr/dicomweb/", "https://proxy.example.org/cxr/dicomweb"),
        ("http://10.1.2.3:8042/dicomweb", "http://10.1.2.3:8042/dicomweb"),
        (" https://[2001:db8::1]/dicomweb ", "https://[2001:db8::1]/dicomweb"),
    ],
)
def test_base_urls_we_take(tmp_path: Path, given: str, kept: str) -> None:
    assert NodeSettings(storage=tmp_path, dicomweb_base_url=given).dicomweb_base_url == kept


@pytest.mark.parametrize(
    "given",
    [
        "ftp://proxy.example.org/dicomweb",
        "proxy.example.org/dicomweb",
        "https://",
        "https:///dicomweb",
        "https://user:secret@proxy.example.org/dicomweb",
        "https://proxy.example.org/dicomweb?x=1",
        "https://proxy.example.org/dicomweb#top",
        "https://proxy.example.org:99999/dicomweb",
        "https://proxy.example.org/dicom web",
        "javascript:alert(1)",
        "https://proxy.example.org/" + "a" * 3000,
    ],
)
def test_base_urls_we_refuse(tmp_path: Path, given: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="dicomweb_base_url"):
        NodeSettings(storage=tmp_path, dicomweb_base_url=given)


def test_answers_name_the_proxy_and_resolve_through_it(tmp_path: Path) -> None:
    """Store, search, retrieve metadata and every bulk data URI it names, all through the
    proxy; a nested BulkDataURI (a Modality LUT over the inline threshold) included."""
    import numpy as np

    ds = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm", size=64))
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = np.arange(4096, dtype="<u2").tobytes()
    item["LUTData"].VR = "OW"
    ds.ModalityLUTSequence = pydicom.Sequence([item])
    ds.preamble = b"\0" * 128
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    with (
        reverse_proxy() as proxy,
        running_node(tmp_path / "node", dicomweb_base_url=proxy.url) as node,
    ):
        proxy.upstream = node.base
        client = DICOMwebClient(url=proxy.url)
        answer = client.store_instances([ds])
        (stored,) = answer.ReferencedSOPSequence
        instance = f"/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
        assert stored.RetrieveURL == proxy.url + instance
        assert answer.RetrieveURL == f"{proxy.url}/studies/{uids[0]}"
        (found,) = client.search_for_instances(uids[0])
        assert found["00081190"]["Value"] == [stored.RetrieveURL]
        (study,) = client.search_for_studies()
        assert study["00081190"]["Value"] == [answer.RetrieveURL]
        meta = client.retrieve_instance_metadata(*uids)
        lut_uri = meta["00283000"]["Value"][0]["00283006"]["BulkDataURI"]
        pixel_uri = meta["7FE00010"]["BulkDataURI"]
        for uri, value in ((lut_uri, item.LUTData), (pixel_uri, ds.PixelData)):
            assert uri.startswith(proxy.url + "/studies/")
            assert client.retrieve_bulkdata(uri) == [value]
        rsp = httpx.get(
            stored.RetrieveURL, headers={"Accept": 'multipart/related; type="application/dicom"'}
        )
        assert rsp.status_code == 200
        assert f"Content-Location: {stored.RetrieveURL}".encode() in rsp.content
        # asked directly, the node still names the proxy (its settings say that is the way in)
        direct = httpx.get(f"{node.base}/studies/{uids[0]}/instances", timeout=60).json()
        assert direct[0]["00081190"]["Value"] == [stored.RetrieveURL]
