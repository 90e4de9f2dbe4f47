"""C-STORE SCU: send result objects (SR, SC) to a destination.

One association per call carries every file given; each file's SOP class is proposed with its
own transfer syntax plus the uncompressed ones, and the socket gets ``TCP_NODELAY``. A
destination with a ``tls_ca`` is reached over TLS 1.2+ (:func:`dicom_node.net.tls.client_context`:
its certificate must be signed by that CA and, by default, name its host). The outcome
of each file is returned (a status is never swallowed); a failure to associate at all raises
:class:`~triage_core.errors.DeliveryError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.destinations import SendResult
from dicom_node.net.tuning import handle_conn_open
from triage_core.errors import ConfigError, DeliveryError

if TYPE_CHECKING:
    from dicom_node.destinations import Destination

logger = logging.getLogger(__name__)

_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")

#: Statuses of the C-STORE response that mean the object is stored (success and warnings).
_WARNINGS = {0xB000, 0xB007, 0xB006}


def _status_text(status: int) -> str:
    if status == 0x0000:
        return "success"
    if status in _WARNINGS or (status & 0xF000) == 0xB000:
        return f"warning 0x{status:04X}"
    if (status & 0xFF00) == 0xA700:
        return f"refused: out of resources (0x{status:04X})"
    if (status & 0xFF00) == 0xA900:
        return f"refused: data set does not match SOP class (0x{status:04X})"
    if (status & 0xF000) == 0xC000:
        return f"refused: cannot understand (0x{status:04X})"
    return f"failed with status 0x{status:04X}"


def _park_reactor(assoc: Any, timeout: float) -> None:
    """Block the association's reactor thread before a C-STORE (pynetdicom 3.0.4 race).

    ``Association.send_c_store`` pauses the reactor by clearing an event and then waits until
    the reactor has flagged itself as paused; but the reactor raises that flag just *before*
    it waits on the event, so it can still run one more pass, take the C-STORE response off
    the queue ("Received unexpected C-STORE service message") and leave ``send_c_store``
    waiting for the whole DIMSE timeout. Seen here under load: about one delivery in a hundred
    stalled 60 s. Clearing the event first and waiting until the reactor thread is really
    blocked on it (a waiter on the event's condition) closes that window.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    if checkpoint is None or waiters is None:  # another pynetdicom: nothing to work around
        return
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while not waiters and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0002)


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str = "CXR_TRIAGE",
    timeout: float = 30.0,
    max_pdu_size: int = 1 << 20,
) -> list[SendResult]:
    """Send ``paths`` (DICOM files) to ``destination`` over one association.

    Raises
    ------
    DeliveryError
        A file cannot be read, the destination's TLS files cannot be loaded, or the association
        is rejected, aborted or not answered.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from pynetdicom import AE, evt

    if not paths:
        return []
    datasets = []
    contexts: dict[str, set[str]] = {}
    for path in paths:
        try:
            ds = dcmread(path)
        except (OSError, InvalidDicomError, ValueError) as exc:
            raise DeliveryError(f"{path}: cannot be read for sending: {exc}") from exc
        datasets.append(ds)
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), set(_UNCOMPRESSED))
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = max_pdu_size
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))

    tls_args = None
    if destination.tls_ca is not None:
        from dicom_node.net.tls import client_context

        try:
            context = client_context(
                destination.tls_ca,
                destination.tls_cert,
                destination.tls_key,
                check_hostname=destination.tls_check_hostname,
            )
        except ConfigError as exc:  # checked at start; a file removed since fails this send
            raise DeliveryError(f"{destination}: {exc}") from exc
        tls_args = (context, destination.host)
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)],
        tls_args=tls_args,
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "association rejected"
        elif assoc.is_aborted:
            why = "no association: connection refused or aborted (peer down?)"
        else:
            why = "no association: peer not answering"
        raise DeliveryError(f"{destination}: {why}")
    results: list[SendResult] = []
    try:
        for path, ds in zip(paths, datasets, strict=True):
            try:
                _park_reactor(assoc, timeout)
                rsp = assoc.send_c_store(ds)
            except (ValueError, RuntimeError, AttributeError) as exc:
                results.append(SendResult(path, None, False, f"not sent: {exc}"))
                continue
            status = getattr(rsp, "Status", None)
            if status is None:
                results.append(
                    SendResult(path, None, False, "no response (timeout or association lost)")
                )
                if not assoc.is_established:
                    break
                continue
            status = int(status)
            ok = status == 0x0000 or (status & 0xF000) == 0xB000
            results.append(SendResult(path, status, ok, _status_text(status)))
    finally:
        if assoc.is_established:
            assoc.release()
    for path in paths[len(results) :]:
        results.append(SendResult(path, None, False, "not sent: association lost"))
    for result in results:
        log = logger.info if result.ok else logger.warning
        log("C-STORE %s -> %s: %s", result.path.name, destination, result.message)
    return results
