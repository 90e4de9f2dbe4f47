"""Who may store by STOW-RS: ``reader`` and ``admin`` (named tokens, the shared ``http_token``,
a proxy user with a reader token), not ``viewer`` (403, nothing read or kept); the anonymous
loopback viewer of a node without any token may. Each rule is tried against a running node on
loopback and on a non-loopback address of this machine (``http_token`` then required), with
dicomweb-client as the sender. Named tokens are added to the node's worklist before it starts."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_support import TOKEN, RunningNode, running_node
from requests import HTTPError
from test_node_support import synthetic_cr

from triage_core.worklist import Worklist

ROLES = ("viewer", "reader", "admin")


def lan_address() -> str | None:
    """A non-loopback address of this machine (the one a default route would use), or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
        address = str(s.getsockname()[0])
        if not address.startswith("127."):
            return address
    return None


def add_tokens(storage: Path) -> dict[str, str]:
    storage.mkdir(parents=True, exist_ok=True)
    worklist = Worklist(Worklist.sqlite_url(storage))
    try:
        worklist.create_all()
        return {role: worklist.tokens.add(f"user.{role}", role) for role in ROLES}
    finally:
        worklist.dispose()


@contextlib.contextmanager
def secured_node(storage: Path, host: str) -> Iterator[tuple[RunningNode, str, dict[str, str]]]:
    tokens = add_tokens(storage)
    with running_node(storage, http_token=TOKEN, http_host=host) as node:
        yield node, f"http://{host}:{node.settings.http_port}/dicomweb", tokens


def sender(base: str, token: str | None) -> DICOMwebClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return DICOMwebClient(url=base, headers=headers)


def store(base: str, token: str | None, path: Path) -> int:
    """The HTTP status of storing ``path`` by STOW-RS with ``token``."""
    try:
        sender(base, token).store_instances([pydicom.dcmread(path)])
    except HTTPError as exc:
        assert exc.response is not None
        return exc.response.status_code
    return 200


def check_roles(node: RunningNode, base: str, tokens: dict[str, str], tmp_path: Path) -> None:
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=32, seed=i) for i in range(5)]
    rsp = httpx.post(
        f"{base}/studies",
        content=b"--b\r\n" + b"x" * 1000,
        headers={
            "Authorization": f"Bearer {tokens['viewer']}",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
        },
        timeout=60,
    )
    assert rsp.status_code == 403
    assert "needs the role reader" in rsp.json()["detail"]
    assert "user.viewer has the role viewer" in rsp.json()["detail"]
    assert store(base, tokens["viewer"], files[0]) == 403
    assert node.spool_files() == [] and node.quarantined() == []  # refused before the body
    assert store(base, None, files[0]) == 401
    assert store(base, tokens["reader"], files[1]) == 200
    assert store(base, tokens["admin"], files[2]) == 200
    assert store(base, TOKEN, files[3]) == 200  # the shared http_token is the admin
    kept = {p.stem for p in node.spool_files()}
    assert kept == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files[1:4]}
    # the viewer still reads what the others stored
    viewer = sender(base, tokens["viewer"])
    assert len(viewer.search_for_studies()) == 3
    ds = pydicom.dcmread(files[1])
    got = viewer.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.SOPInstanceUID == ds.SOPInstanceUID


def test_roles_on_loopback(tmp_path: Path) -> None:
    with secured_node(tmp_path / "node", "127.0.0.1") as (node, base, tokens):
        check_roles(node, base, tokens, tmp_path)


def test_roles_off_loopback(tmp_path: Path) -> None:
    address = lan_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with secured_node(tmp_path / "node", address) as (node, base, tokens):
        assert not node.settings.http_host.startswith("127.")
        check_roles(node, base, tokens, tmp_path)


def test_anonymous_loopback_may_store(tmp_path: Path) -> None:
    with running_node(tmp_path / "open") as node:
        path = synthetic_cr(tmp_path / "a.dcm", size=32)
        assert store(node.base, None, path) == 200
        assert len(node.spool_files()) == 1


def test_proxy_users_store_by_the_role_of_their_token(tmp_path: Path) -> None:
    """Behind an authenticating proxy: a user with a reader token stores, one with a viewer
    token or none is a viewer and is refused."""
    tokens = add_tokens(tmp_path / "proxied")
    assert tokens
    with running_node(tmp_path / "proxied", http_proxy_header="X-Remote-User") as node:
        for user, status in (("user.reader", 200), ("user.viewer", 403), ("someone", 403)):
            path = synthetic_cr(tmp_path / f"{user}.dcm", size=32)
            client = DICOMwebClient(url=node.base, headers={"X-Remote-User": user})
            try:
                client.store_instances([pydicom.dcmread(path)])
                got = 200
            except HTTPError as exc:
                assert exc.response is not None
                got = exc.response.status_code
            assert got == status, user
        assert len(node.spool_files()) == 1
