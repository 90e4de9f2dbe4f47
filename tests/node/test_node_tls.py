"""DICOM over TLS (PS3.15 Annex B, BCP 195) with Debian's DCMTK on the other end.

Certificates are made by the test with ``openssl``: a CA, a server certificate for 127.0.0.1
and a client certificate signed by it, and a second, untrusted CA with its own client and
server certificates. Our SCP requires client certificates (a CA is configured), and our SCU
verifies the destination's certificate and host name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_node_support import (
    STORESCP,
    STORESCU,
    dcmtk_env,
    free_port,
    needs_dcmtk,
    synthetic_cr,
    wait_port,
)
from test_node_ulp import Scp, running_scp

from dicom_node.net.scu import send_files
from dicom_node.net.tls import client_context, server_context
from dicom_node.settings import Destination, load_settings
from triage_core.errors import ConfigError, DeliveryError

OPENSSL = "/usr/bin/openssl"
pytestmark = [
    needs_dcmtk,
    pytest.mark.skipif(not Path(OPENSSL).exists(), reason="openssl is not installed"),
]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]  # key, certificate
    client: tuple[Path, Path]
    rogue_client: tuple[Path, Path]  # signed by another CA
    rogue_server: tuple[Path, Path]


def _openssl(*args: str) -> None:
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
    )  # fmt: skip
    return key, cert


def _issue(folder: Path, name: str, ca: tuple[Path, Path], server: bool) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    ext = folder / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else ""
    ext.write_text(f"{san}extendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = _ca(folder, "ca"), _ca(folder, "rogue-ca")
    return Pki(
        ca=ca[1],
        server=_issue(folder, "server", ca, server=True),
        client=_issue(folder, "client", ca, server=False),
        rogue_client=_issue(folder, "rogue-client", rogue, server=False),
        rogue_server=_issue(folder, "rogue-server", rogue, server=True),
    )


@pytest.fixture
def tls_scp(tmp_path: Path, pki: Pki) -> Iterator[Scp]:
    key, cert = pki.server
    with running_scp(tmp_path, tls_cert=cert, tls_key=key, tls_ca=pki.ca, artim_timeout=5.0) as scp:
        yield scp


def _storescu(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    cmd = [STORESCU, "-aet", "STORESCU", "-aec", "CXR_TRIAGE", "-to", "10", *tls]
    return subprocess.run(
        [*cmd, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60, env=dcmtk_env(), check=False,
    )  # fmt: skip


def _stored(scp: Scp) -> int:
    return len(list((scp.storage / "spool").rglob("*.dcm")))


def test_storescu_over_tls_stores_with_a_trusted_client_certificate(
    tls_scp: Scp, pki: Pki, tmp_path: Path
) -> None:
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=64, seed=i) for i in range(2)]
    key, cert = pki.client
    proc = _storescu(tls_scp.port, files, "+tls", str(key), str(cert), "+cf", str(pki.ca))
    assert proc.returncode == 0, proc.stderr
    assert _stored(tls_scp) == 2


@pytest.mark.parametrize("client", ["rogue", "anonymous"])
def test_client_without_a_trusted_certificate_is_refused(
    tls_scp: Scp, pki: Pki, tmp_path: Path, client: str
) -> None:
    files = [synthetic_cr(tmp_path / "a.dcm", size=32, seed=1)]
    if client == "rogue":
        key, cert = pki.rogue_client
        tls = ("+tls", str(key), str(cert), "+cf", str(pki.ca))
    else:  # TLS without any client certificate
        tls = ("+tla", "+cf", str(pki.ca))
    proc = _storescu(tls_scp.port, files, *tls)
    assert proc.returncode != 0
    assert _stored(tls_scp) == 0


def test_plain_tcp_client_is_refused_on_the_tls_port(
    tls_scp: Scp, pki: Pki, tmp_path: Path
) -> None:
    files = [synthetic_cr(tmp_path / "a.dcm", size=32, seed=1)]
    proc = _storescu(tls_scp.port, files)
    assert proc.returncode != 0
    assert _stored(tls_scp) == 0
    key, cert = pki.client  # and the port still serves TLS peers
    proc = _storescu(tls_scp.port, files, "+tls", str(key), str(cert), "+cf", str(pki.ca))
    assert proc.returncode == 0, proc.stderr


@contextlib.contextmanager
def _tls_storescp(out: Path, port: int, server: tuple[Path, Path], ca: Path) -> Iterator[Path]:
    out.mkdir(parents=True, exist_ok=True)
    key, cert = server
    proc = subprocess.Popen(
        [STORESCP, "-aet", "PACS", "-od", str(out), "+tls", str(key), str(cert),
         "+cf", str(ca), "-rc", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_port(port, 10), "storescp did not start"
        yield out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_our_scu_sends_over_tls_with_its_client_certificate(pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=32, seed=i) for i in range(2)]
    key, cert = pki.client
    with _tls_storescp(tmp_path / "out", port, pki.server, pki.ca) as out:
        destination = Destination(
            ae_title="PACS", host="127.0.0.1", port=port, tls_ca=pki.ca, tls_cert=cert, tls_key=key
        )
        results = send_files(destination, files, timeout=10)
        assert [r.status for r in results] == [0, 0]
        assert len(list(out.iterdir())) == 2
        # a destination whose certificate our CA did not sign: no association, nothing sent
        rogue_port = free_port()
        with _tls_storescp(
            tmp_path / "untrusted", rogue_port, pki.rogue_server, pki.ca
        ) as rogue_out:
            rogue = destination.model_copy(update={"port": rogue_port})
            with pytest.raises(DeliveryError):
                send_files(rogue, files, timeout=10)
            assert not list(rogue_out.iterdir())


def test_tls_settings_fail_fast(pki: Pki, tmp_path: Path) -> None:
    key, cert = pki.server
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        load_settings(None, {"tls_cert": cert})
    with pytest.raises(ConfigError, match="tls_ca"):
        load_settings(None, {"tls_ca": pki.ca})
    with pytest.raises(ConfigError, match="tls_cert"):
        server_context(tmp_path / "missing.pem", key)
    with pytest.raises(ConfigError, match="tls_ca"):
        client_context(tmp_path / "missing-ca.pem")
    context = server_context(cert, key, pki.ca)
    assert context.minimum_version.name == "TLSv1_2"
    with pytest.raises(ConfigError, match="tls_cert needs tls_ca"):
        load_settings(None, {"destinations": [{"ae_title": "P", "host": "h", "port": 1,
                                               "tls_cert": cert, "tls_key": key}]})  # fmt: skip


def test_a_tls_destination_is_a_toml_table(pki: Pki, tmp_path: Path) -> None:
    key, cert = pki.client
    config = tmp_path / "triage.toml"
    config.write_text(
        f'destinations = ["PLAIN@h:104", {{ ae_title = "PACS", host = "127.0.0.1", port = 2762, '
        f'tls_ca = "{pki.ca}", tls_cert = "{cert}", tls_key = "{key}" }}]\n'
    )
    settings = load_settings(config)
    plain, secure = settings.destinations
    assert plain.tls_ca is None and str(plain) == "PLAIN@h:104"
    assert secure.tls_ca == pki.ca and str(secure) == "PACS@127.0.0.1:2762"
    # delivery rows store "AE@HOST:PORT"; the sender gets the TLS settings back by that text
    assert settings.destination("PACS@127.0.0.1:2762") == secure
    assert settings.destination("OLD@h:104").tls_ca is None


def test_a_vanished_ca_file_fails_the_send_not_the_sender(pki: Pki, tmp_path: Path) -> None:
    files = [synthetic_cr(tmp_path / "a.dcm", size=32, seed=1)]
    gone = Destination(ae_title="PACS", host="127.0.0.1", port=free_port(), tls_ca=tmp_path / "x")
    with pytest.raises(DeliveryError, match="CA file"):
        send_files(gone, files, timeout=5)


def _s_client(port: int, pki: Pki, *version: str) -> str:
    key, cert = pki.client
    proc = subprocess.run(
        [OPENSSL, "s_client", "-brief", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki.ca),
         "-cert", str(cert), "-key", str(key), *version],
        input="", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return proc.stdout + proc.stderr


def test_only_tls_1_2_and_later_are_spoken(tls_scp: Scp, pki: Pki) -> None:
    # the client offers TLS 1.1 only (allowed on its side by security level 0): the node
    # answers with the "protocol version" alert
    old = _s_client(tls_scp.port, pki, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "alert protocol version" in old
    assert "Protocol version: TLSv1.2" in _s_client(tls_scp.port, pki, "-tls1_2")
    assert "Protocol version: TLSv1.3" in _s_client(tls_scp.port, pki, "-tls1_3")


def test_repeated_handshake_failures_from_one_host_are_logged_at_a_bounded_rate(
    tls_scp: Scp, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import time

    from dicom_node.net import server as server_module

    files = [synthetic_cr(tmp_path / "a.dcm", size=32, seed=1)]
    with caplog.at_level(logging.WARNING, logger="dicom_node.net"):
        for _ in range(4):  # plain TCP to the TLS port: four failed handshakes
            assert _storescu(tls_scp.port, files).returncode != 0
        time.sleep(0.5)  # the association threads log as they end
    lines = [r.getMessage() for r in caplog.records if "TLS" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("connection from 127.0.0.1:")
    caplog.clear()
    # once the interval has passed, the next failure is logged with the count of the others
    host, (logged_at, suppressed) = next(iter(tls_scp.server._tls_log.items()))
    assert host == "127.0.0.1" and suppressed == 3
    tls_scp.server._tls_log[host] = (logged_at - server_module.TLS_LOG_INTERVAL, suppressed)
    with caplog.at_level(logging.WARNING, logger="dicom_node.net"):
        tls_scp.server.tls_failed("127.0.0.1:5555", "TLS: WRONG_VERSION_NUMBER")
    assert caplog.records[-1].getMessage().endswith("(3 more from 127.0.0.1 not logged)")
