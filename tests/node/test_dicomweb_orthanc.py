"""DICOMweb against a real PACS: Orthanc with Debian's ``orthanc-dicomweb`` plugin, started by
the test as a throwaway loopback server (one per module). Orthanc pushes a study to the node
with its own DICOMweb client (STOW-RS); the node triages it (random-weight model: plumbing
only) and delivers the SR and the Grad-CAM SC into Orthanc by STOW-RS, where Orthanc's own
QIDO-RS finds them and its WADO-RS gives back what we sent."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_support import RunningNode, running_node
from test_node_support import free_port

#: Generous timeouts: the tests share a loaded 2-core machine.
get = functools.partial(httpx.get, timeout=120)
post = functools.partial(httpx.post, timeout=120)
ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CHEST = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # SIIM CR chest PA

pytestmark = pytest.mark.skipif(
    not (ORTHANC.exists() and PLUGIN.exists()),
    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc "
    "orthanc-dicomweb)",
)


@dataclass
class Orthanc:
    rest: str

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"


def wait_for(check: Callable[[], bool], timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@contextlib.contextmanager
def orthanc(folder: Path, node_http_port: int) -> Iterator[Orthanc]:
    """Orthanc on loopback, its DICOMweb plugin on, our node as its DICOMweb server 'triage'."""
    http_port = free_port()
    config = {
        "Name": "cxr-triage-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {"triage": [f"http://127.0.0.1:{node_http_port}/dicomweb/"]},
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["nice", "-n", "10", str(ORTHANC), str(folder / "config.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rest = f"http://127.0.0.1:{http_port}"

    def up() -> bool:
        assert proc.poll() is None, (folder / "orthanc.log").read_text()[-2000:]
        try:
            return get(f"{rest}/system", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "Orthanc to start")
        yield Orthanc(rest)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def peers(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path
) -> Iterator[tuple[RunningNode, Orthanc]]:
    root = tmp_path_factory.mktemp("orthanc-peer")
    http_port = free_port()
    with orthanc(root / "orthanc", http_port) as pacs:
        with running_node(
            root / "node",
            model=tiny_checkpoint,
            http_port=http_port,
            destinations=[pacs.dicomweb],
            delivery_backoff=0.5,
        ) as node:
            yield node, pacs


def test_orthanc_pushes_we_deliver_orthanc_finds(
    peers: tuple[RunningNode, Orthanc], dicom_dir: Path
) -> None:
    node, pacs = peers
    source = dicom_dir / CHEST
    original = pydicom.dcmread(source)
    study = str(original.StudyInstanceUID)
    uploaded = post(f"{pacs.rest}/instances", content=source.read_bytes(), timeout=30)
    assert uploaded.status_code == 200, uploaded.text
    orthanc_study = uploaded.json()["ParentStudy"]
    # Orthanc's DICOMweb client stores the study into the node
    pushed = post(
        f"{pacs.dicomweb}/servers/triage/stow",
        json={"Resources": [orthanc_study], "Synchronous": True},
        timeout=60,
    )
    assert pushed.status_code == 200, pushed.text
    (spooled,) = node.spool_files()
    assert spooled.stem == original.SOPInstanceUID
    assert pydicom.dcmread(spooled) == original  # every attribute as Orthanc had it

    # triaged, then the SR, SC and PM delivered into Orthanc by STOW-RS
    def delivered() -> bool:
        detail = node.worklist.queries.study_detail(study) or {}
        rows = detail.get("deliveries", [])
        return len(rows) == 3 and all(r["status"] == "sent" for r in rows)

    wait_for(delivered, 180, "the SR, SC and PM to be delivered")
    detail = node.worklist.queries.study_detail(study)
    assert detail is not None and detail["status"] == "done"
    assert {d["destination"] for d in detail["deliveries"]} == {pacs.dicomweb}
    # Orthanc's own QIDO-RS finds them as new series of the study
    series = get(f"{pacs.dicomweb}/studies/{study}/series", timeout=30).json()
    modalities = sorted(pydicom.Dataset.from_json(s).Modality for s in series)
    assert modalities == ["CR", "OT", "OT", "SR"]  # the SC and the PM are both OT
    for path in sorted((node.storage / "outbox" / study).glob("*.dcm")):
        ours = pydicom.dcmread(path)
        url = (
            f"{pacs.dicomweb}/studies/{study}/series/{ours.SeriesInstanceUID}/instances/"
            f"{ours.SOPInstanceUID}"
        )
        rsp = get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert rsp.status_code == 200
        part = rsp.content.split(b"\r\n\r\n", 1)[1]
        theirs = pydicom.dcmread(io.BytesIO(part))
        assert theirs.SOPInstanceUID == ours.SOPInstanceUID
        assert theirs.SOPClassUID == ours.SOPClassUID
        if "PixelData" in ours:
            assert theirs.PixelData == ours.PixelData
    # the worklist page shows the DICOMweb deliveries like C-STORE ones
    page = get(f"http://127.0.0.1:{node.settings.http_port}/studies/{study}").text
    assert pacs.dicomweb in page and "sent" in page


def test_orthanc_qido_and_wado_of_the_node(peers: tuple[RunningNode, Orthanc]) -> None:
    """Orthanc's DICOMweb client reads the node: QIDO-RS through its server proxy."""
    node, pacs = peers
    found = post(f"{pacs.dicomweb}/servers/triage/get", json={"Uri": "/studies"}, timeout=30)
    assert found.status_code == 200, found.text
    studies = {pydicom.Dataset.from_json(s).StudyInstanceUID for s in found.json()}
    assert studies == {d.name for d in (node.storage / "spool").iterdir() if d.name[0].isdigit()}
