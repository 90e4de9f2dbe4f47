"""C-STORE SCU against real peers: success, refusal statuses, destination down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_node_support import free_port, synthetic_cr

from dicom_node.net.scu import send_files
from dicom_node.settings import Destination
from triage_core.errors import DeliveryError


@pytest.fixture
def peer() -> Iterator[tuple[int, list[int], list[str]]]:
    """A pynetdicom SCP whose C-STORE status comes from ``statuses`` (popped per request)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    statuses: list[int] = []
    received: list[str] = []

    def store(event: evt.Event) -> int:
        received.append(str(getattr(event.request, "AffectedSOPInstanceUID", "")))
        return statuses.pop(0) if statuses else 0x0000

    ae = AE(ae_title="PEER")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax))
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    assert server is not None
    try:
        yield port, statuses, received
    finally:
        server.shutdown()


def test_send_reports_each_status(peer: tuple[int, list[int], list[str]], tmp_path: Path) -> None:
    port, statuses, received = peer
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=32, seed=i) for i in range(3)]
    statuses.extend([0x0000, 0xA700, 0xB000])
    results = send_files(Destination(ae_title="PEER", host="127.0.0.1", port=port), files)
    assert [r.status for r in results] == [0x0000, 0xA700, 0xB000]
    assert [r.ok for r in results] == [True, False, True]
    assert "out of resources" in results[1].message
    assert len(received) == 3


def test_destination_down_raises_delivery_error(tmp_path: Path) -> None:
    path = synthetic_cr(tmp_path / "a.dcm", size=32)
    with pytest.raises(DeliveryError, match="no association"):
        send_files(Destination(ae_title="NOBODY", host="127.0.0.1", port=free_port()), [path])
    with pytest.raises(DeliveryError, match="cannot be read"):
        send_files(Destination(ae_title="X", host="127.0.0.1", port=1), [tmp_path / "missing"])


def test_reactor_is_blocked_before_each_c_store(
    peer: tuple[int, list[int], list[str]], tmp_path: Path
) -> None:
    """The pynetdicom race work-around: after ``_park_reactor`` the association's reactor
    thread waits on its checkpoint (it cannot take a C-STORE response away), and the
    C-STOREs that follow still get their responses."""
    from pynetdicom import AE

    from dicom_node.net.scu import _park_reactor

    port, _statuses, received = peer
    path = synthetic_cr(tmp_path / "a.dcm", size=32)
    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="PEER")
    assert assoc.is_established
    try:
        import pydicom

        ds = pydicom.dcmread(path)
        for _ in range(20):
            _park_reactor(assoc, timeout=5.0)
            assert not assoc._reactor_checkpoint.is_set()
            assert len(assoc._reactor_checkpoint._cond._waiters) == 1  # blocked in wait()
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert len(received) == 20
