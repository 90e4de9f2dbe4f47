"""The receipt journal: durable records, group commit, rotation, replay after a crash (also of a
real ``triage serve`` killed with SIGKILL right after its C-STORE answers)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pydicom
from test_node_support import (
    ServeProcess,
    free_port,
    needs_dcmtk,
    storescu,
    synthetic_cr,
)

from dicom_node.handlers import StoreContext
from dicom_node.journal import SEGMENT_GLOB, JournalEntry, ReceiptJournal, read_records
from dicom_node.service import make_record_many, make_recorder, open_worklist
from dicom_node.settings import load_settings


def _store(storage: Path) -> tuple[StoreContext, object]:
    settings = load_settings(None, {"storage": storage})
    worklist = open_worklist(settings)
    store = StoreContext(
        storage=storage, record=make_recorder(worklist), record_many=make_record_many(worklist)
    )
    return store, worklist


def _header(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "accession_number": str(ds.get("AccessionNumber", "")),
        "calling_ae": "TEST",
    }


def _spool_path(storage: Path, header: dict[str, str]) -> Path:
    return (
        storage
        / "spool"
        / header["study_uid"]
        / header["series_uid"]
        / f"{header['sop_instance_uid']}.dcm"
    )


def test_crash_before_materialisation_is_replayed_at_next_open(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    store, worklist = _store(storage)
    stuck = threading.Event()

    def never(_entries: list[JournalEntry]) -> None:  # the process "dies" before this ends
        stuck.wait()

    first = ReceiptJournal(storage / "journal", never, segment_size=4 << 20).open()
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=64, seed=i) for i in range(5)]
    headers = [_header(f) for f in files]
    for path, header in zip(files, headers, strict=True):
        first.append(header, path.read_bytes())
    assert first.appends == 5
    segment = sorted((storage / "journal").glob(SEGMENT_GLOB))[0]
    # the records are on disk, readable without the journal object
    assert [e.header["sop_instance_uid"] for e in read_records(segment)] == [
        h["sop_instance_uid"] for h in headers
    ]
    # a torn record at the tail (never acknowledged): a valid start, a wrong checksum
    assert first._segment is not None
    end = first._segment.written
    torn = files[0].read_bytes()
    with open(segment, "r+b") as handle:
        handle.seek(end)
        handle.write(b"CXRJ" + (9).to_bytes(4, "little") + len(torn).to_bytes(8, "little"))
        handle.write(b"\x00\x00\x00\x00" + b'{"a":"b"}' + torn[:100])
    # one spool file left empty by the crash (written, never flushed)
    empty = _spool_path(storage, headers[1])
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")

    second = ReceiptJournal(storage / "journal", store.materialize, segment_size=4 << 20).open()
    try:
        assert second.replayed == 5
        assert not segment.exists(), "a replayed segment is deleted"
        for path, header in zip(files, headers, strict=True):
            assert _spool_path(storage, header).read_bytes() == path.read_bytes()
        rows = worklist.list_worklist(limit=10)  # type: ignore[attr-defined]
        assert sum(r["num_instances"] for r in rows) == 5
    finally:
        second.close()
        stuck.set()
        worklist.dispose()  # type: ignore[attr-defined]
    assert not list((storage / "journal").glob("*.wal"))


def test_group_commit_one_flush_covers_waiting_appends(tmp_path: Path) -> None:
    journal = ReceiptJournal(tmp_path / "journal", lambda _entries: None, segment_size=4 << 20)
    journal.open()
    try:
        payload = os.urandom(40_000)
        journal._sync_lock.acquire()  # a flush "in progress": the appenders queue behind it
        threads = [
            threading.Thread(
                target=journal.append, args=({"n": str(i)}, payload), name=f"appender-{i}"
            )
            for i in range(4)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while journal.appends < 4:  # every record written, all four now wait for a flush
            assert time.monotonic() < deadline
            time.sleep(0.005)
        flushes = journal.flushes
        journal._sync_lock.release()
        for thread in threads:
            thread.join(10)
        assert journal.flushes - flushes == 1, "one fdatasync covered the four records"
    finally:
        journal.close()


def test_segments_rotate_and_go_once_materialised(tmp_path: Path) -> None:
    done: list[str] = []
    journal = ReceiptJournal(
        tmp_path / "journal",
        lambda entries: done.extend(e.header["n"] for e in entries),
        segment_size=1 << 20,
        idle_seconds=0.3,
        gather_seconds=0.01,
    ).open()
    try:
        payload = os.urandom(200_000)
        assert journal.fits(len(payload)) and not journal.fits(1 << 20)
        for i in range(12):  # 2.4 MB through 1 MB segments
            journal.append({"n": str(i)}, payload)
        # four appenders at once: rotations while the spare is still being zero-filled
        threads = [
            threading.Thread(
                target=lambda k=k: [journal.append({"n": f"t{k}-{j}"}, payload) for j in range(6)]
            )
            for k in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        folder = tmp_path / "journal"

        def holding_records() -> list[Path]:
            return [s for s in folder.glob(SEGMENT_GLOB) if list(read_records(s))]

        deadline = time.monotonic() + 20
        while len(done) < 36 or holding_records():
            assert time.monotonic() < deadline, sorted(folder.iterdir())
            time.sleep(0.05)
        assert done[:12] == [str(i) for i in range(12)], "materialised in order"
        expected = {f"t{k}-{j}" for k in range(4) for j in range(6)}
        assert sorted(done[12:]) == sorted(expected), "each exactly once"
        # full segments went once materialised, the last one once idle: what is left is the
        # empty current segment and the zero-filled spare
        assert len(list(folder.glob(SEGMENT_GLOB))) == 2
    finally:
        journal.close()
    assert not list((tmp_path / "journal").glob("*.wal"))


def test_materialise_keeps_a_live_first_copy_but_repairs_on_replay(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    store, worklist = _store(storage)
    path = synthetic_cr(tmp_path / "a.dcm", size=64, seed=3)
    header = _header(path)
    target = _spool_path(storage, header)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"first copy")
    store.materialize([JournalEntry(header, path.read_bytes())])
    assert target.read_bytes() == b"first copy"  # a live repeat never replaces the first
    store.materialize([JournalEntry(header, path.read_bytes(), replayed=True)])
    assert target.read_bytes() == path.read_bytes()  # a replay repairs what a crash left
    rows = worklist.list_worklist()  # type: ignore[attr-defined]
    assert len(rows) == 1 and rows[0]["num_instances"] == 1
    worklist.dispose()  # type: ignore[attr-defined]


@needs_dcmtk
def test_serve_killed_after_acknowledging_replays_the_journal(tmp_path: Path) -> None:
    """SIGKILL right after storescu got its success statuses: nothing is in the spool or the
    worklist yet (the batch window is long); after a restart every instance is, byte for byte."""
    storage = tmp_path / "storage"
    port = free_port()
    args = [
        "serve", "--port", str(port), "--bind-address", "127.0.0.1", "--storage", str(storage),
        "--workers", "0", "--http-port", "0", "--stable-age", "3600",
    ]  # fmt: skip
    env = {"TRIAGE_JOURNAL_BATCH_WINDOW": "60"}
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=64, seed=10 + i) for i in range(12)]
    serve = ServeProcess(args, tmp_path / "serve.log", env).start()
    try:
        serve.wait_ready(port)
        proc = storescu(port, files)
        assert proc.returncode == 0, proc.stderr
        serve.kill9()
        assert not list((storage / "spool").rglob("*.dcm")), "materialised before the kill"
        segments = list((storage / "journal").glob(SEGMENT_GLOB))
        acknowledged = [e for s in segments for e in read_records(s)]
        assert len(acknowledged) == len(files)
        serve = ServeProcess(args, tmp_path / "serve2.log").start()
        serve.wait_ready(port)
        assert "12 instance(s) replayed" in serve.log()
    finally:
        serve.stop()
    settings = load_settings(None, {"storage": storage})
    worklist = open_worklist(settings)
    try:
        rows = worklist.list_worklist(limit=100)
        assert sum(r["num_instances"] for r in rows) == len(files)
    finally:
        worklist.dispose()
    for path in files:
        header = _header(path)
        stored = _spool_path(storage, header)
        back = pydicom.dcmread(stored)
        assert back.SOPInstanceUID == header["sop_instance_uid"]
        assert back.PixelData == pydicom.dcmread(path).PixelData


def test_metrics_show_pending_journal_records_and_open_associations(tmp_path: Path) -> None:
    from pynetdicom import AE

    from dicom_node.metrics import Metrics
    from dicom_node.scp import start_scp

    storage = tmp_path / "storage"
    store, worklist = _store(storage)
    settings = load_settings(
        None, {"port": free_port(), "bind_address": "127.0.0.1", "storage": storage}
    )
    journal = ReceiptJournal(storage / "journal", store.materialize, gather_seconds=30).open()
    store.journal = journal
    server = start_scp(settings, store)
    metrics = Metrics()
    metrics.attach_receiver(
        lambda: float(journal.pending), lambda: float(len(server.active_associations))
    )

    def gauge(name: str) -> float:
        text = metrics.render()[0].decode()
        (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
        return float(line.split()[1])

    path = synthetic_cr(tmp_path / "a.dcm", size=64, seed=5)
    ae = AE(ae_title="METRICS")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    try:
        assoc = ae.associate("127.0.0.1", settings.port, ae_title="CXR_TRIAGE")
        assert assoc.is_established
        assert assoc.send_c_store(path).Status == 0x0000
        assert gauge("triage_associations_open") == 1.0
        assert gauge("triage_journal_pending") == 1.0  # acknowledged, batch window still open
        assoc.release()
        deadline = time.monotonic() + 5
        while gauge("triage_associations_open") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gauge("triage_associations_open") == 0.0
    finally:
        server.shutdown()
        journal.close()
        worklist.dispose()  # type: ignore[attr-defined]
    assert gauge("triage_journal_pending") == 0.0  # materialised at close
    stored = pydicom.dcmread(_spool_path(storage, _header(path)))
    assert stored.PixelData == pydicom.dcmread(path).PixelData
