"""STOW-RS destinations: settings (flag text, TOML tables with token and TLS), and one node
delivering its SR and SC to another node's DICOMweb root by STOW-RS with a bearer token,
through the delivery table's retries (receiver down first, then a wrong token, then up)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from dicomweb_support import TOKEN, running_node
from test_node_support import free_port, synthetic_cr

from dicom_node.destinations import DicomwebDestination
from dicom_node.dicomweb.stowrs import send_files
from dicom_node.settings import Destination, load_settings
from triage_core.errors import ConfigError, DeliveryError


def wait_for(check: Callable[[], bool], timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_destinations_from_flags_and_toml(tmp_path: Path) -> None:
    flags = load_settings(
        None, {"destinations": ["PACS@10.0.0.5:104", "http://pacs:8042/dicom-web/"]}
    )
    ae, web = flags.destinations
    assert isinstance(ae, Destination) and isinstance(web, DicomwebDestination)
    assert str(web) == "http://pacs:8042/dicom-web"  # the delivery rows' key, no trailing /
    assert flags.destination("http://pacs:8042/dicom-web") is web
    assert isinstance(flags.destination("http://gone:1/x"), DicomwebDestination)
    toml = tmp_path / "t.toml"
    toml.write_text(
        'destinations = [{ url = "https://web.example.org/dicomweb", token = "s3cret-token", '
        'tls_ca = "/etc/ca.pem" }, "PACS@pacs:104"]\n'
    )
    loaded = load_settings(toml)
    first = loaded.destinations[0]
    assert isinstance(first, DicomwebDestination)
    assert first.token is not None and first.token.get_secret_value() == "s3cret-token"
    assert "s3cret" not in repr(loaded)  # a secret, never printed
    assert loaded.destination("https://web.example.org/dicomweb").tls_ca == Path("/etc/ca.pem")


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("ftp://pacs/dicomweb", "AE@HOST:PORT"),
        ("http://user@pacs/dicomweb", "http:// or https:// URL"),
        ("http://pacs/dicomweb?x=1", "http:// or https:// URL"),
        ({"url": "http://pacs/x", "tls_ca": "/ca.pem"}, "need an https:// URL"),
        ({"url": "https://pacs/x", "tls_cert": "/c.pem"}, "go together"),
    ],
)
def test_bad_dicomweb_destinations_are_refused(value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match="destinations") as err:
        load_settings(None, {"destinations": [value]})
    assert needle in str(err.value)


def test_nobody_listening_raises_for_a_retry(tmp_path: Path) -> None:
    path = synthetic_cr(tmp_path / "x.dcm", size=32)
    with pytest.raises(DeliveryError, match="no STOW-RS answer"):
        send_files(DicomwebDestination(url=f"http://127.0.0.1:{free_port()}/dicomweb"), [path])


def test_node_to_node_by_stow_rs_with_token_and_retries(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    receiver_port = free_port()
    url = f"http://127.0.0.1:{receiver_port}/dicomweb"
    study = pydicom.uid.generate_uid()
    source = synthetic_cr(tmp_path / "chest.dcm", study_uid=study, size=256, seed=5)
    with running_node(
        tmp_path / "sender",
        model=tiny_checkpoint,
        destinations=[{"url": url, "token": TOKEN}],
        delivery_backoff=0.5,
        delivery_backoff_max=1.0,
        delivery_max_attempts=1000,
    ) as sender:
        client_rsp = __import__("httpx").post(
            f"{sender.base}/studies",
            timeout=120,
            content=(
                b"--b\r\nContent-Type: application/dicom\r\n\r\n"
                + source.read_bytes()
                + b"\r\n--b--\r\n"
            ),
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
        assert client_rsp.status_code == 200

        def deliveries() -> list[dict]:
            return list((sender.worklist.queries.study_detail(study) or {}).get("deliveries", []))

        # nobody listens yet: the three objects (SR, SC, PM) pending, retried, the error recorded
        wait_for(lambda: len(deliveries()) == 3 and all(d["attempts"] >= 1 for d in deliveries()))
        assert all(d["status"] == "pending" for d in deliveries())
        assert all("no STOW-RS answer" in d["last_error"] for d in deliveries())
        # a receiver with another token: refused (401), still pending
        with running_node(
            tmp_path / "wrong-token", http_port=receiver_port, http_token="another-token-0123456"
        ):
            before = max(d["attempts"] for d in deliveries())
            wait_for(lambda: min(d["attempts"] for d in deliveries()) > before, what="a retry")
            assert all(d["status"] == "pending" for d in deliveries())
            assert any("HTTP 401" in d["last_error"] for d in deliveries())
        # the real receiver comes up: all delivered, found there by QIDO-RS
        with running_node(
            tmp_path / "receiver", http_port=receiver_port, http_token=TOKEN
        ) as receiver:
            wait_for(lambda: all(d["status"] == "sent" for d in deliveries()), what="delivery")
            outputs = sorted((sender.storage / "outbox" / study).glob("*.dcm"))
            received = {p.stem: p for p in receiver.spool_files()}
            assert sorted(received) == sorted(p.stem for p in outputs)
            for path in outputs:
                assert pydicom.dcmread(received[path.stem]) == pydicom.dcmread(path)
            assert {d["destination"] for d in deliveries()} == {url}
