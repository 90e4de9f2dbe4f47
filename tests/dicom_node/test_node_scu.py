"""C-STORE SCU against real peers: success, refusal statuses, destination down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_node_support import free_port, synthetic_cr

from dicom_node.scu import send_files
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
