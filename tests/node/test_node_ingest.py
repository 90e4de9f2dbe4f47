"""C-STORE SCP over real loopback associations (DCMTK storescu/echoscu and pynetdicom): durable
raw ingest, every shared transfer syntax, allow-list, refusals that quarantine and keep serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from test_node_support import (
    dataset_bytes,
    echo,
    free_port,
    needs_dcmtk,
    send_raw,
    storescu,
    synthetic_cr,
)

from dicom_node.ingest.incoming import IncomingInstance
from dicom_node.ingest.scanner import scan_dataset
from dicom_node.ingest.spool import GroupCommitter, StoreContext, make_record_many, make_recorder
from dicom_node.node import open_worklist
from dicom_node.settings import load_settings
from dicom_node.stages.receive import start_scp
from triage_core.errors import ImageReadError, TruncatedFileError
from triage_core.uids import is_valid_uid


@dataclass
class Node:
    port: int
    storage: Path
    worklist: object
    store: StoreContext
    server: object


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """The SCP as ``triage serve`` runs it: every instance through its own fsynced file, rows
    through the group committer."""
    storage = tmp_path / "storage"
    settings = load_settings(
        None,
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage": storage,
            "allow_ae": ["STORESCU", "ECHOSCU", "RAWSCU", "HOSTED@127.0.0.1"],
        },
    )
    worklist = open_worklist(settings)
    committer = GroupCommitter(make_record_many(worklist))
    store = StoreContext(storage=storage, record=make_recorder(worklist), committer=committer)
    server = start_scp(settings, store)
    try:
        yield Node(settings.port, storage, worklist, store, server)
    finally:
        server.shutdown()
        committer.close()
        worklist.dispose()


def _spooled(storage: Path) -> dict[str, Path]:
    return {p.stem: p for p in (storage / "spool").rglob("*.dcm")}


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@needs_dcmtk
def test_every_shared_transfer_syntax_is_stored_byte_for_byte(node: Node, dicom_dir: Path) -> None:
    files = sorted(dicom_dir.glob("*.dcm"))
    assert len(files) >= 10
    first_sent: dict[str, Path] = {}
    refused: list[Path] = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        proc = storescu(node.port, [path])
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
        if not is_valid_uid(str(ds.SOPInstanceUID)):
            # CR-ModalitySequenceLUT.dcm's UID "999.999.01.23.45.6789" has a leading zero:
            # refused (0xC210) and quarantined, never used as a path
            refused.append(path)
            continue
        first_sent.setdefault(str(ds.SOPInstanceUID), path)
    assert [p.name for p in refused] == ["CR-ModalitySequenceLUT.dcm"]
    spooled = _spooled(node.storage)
    assert set(spooled) == set(first_sent)
    for sop_uid, path in first_sent.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = spooled[sop_uid]
        # study/series/sop layout; same transfer syntax, same elements, same pixel bytes
        # (storescu itself may rewrite header details, so whole bytes are compared below with
        # a raw pynetdicom sender)
        assert stored.parent.name == str(ds.SeriesInstanceUID)
        assert stored.parent.parent.name == str(ds.StudyInstanceUID)
        back = pydicom.dcmread(stored)
        orig = pydicom.dcmread(path)
        assert back.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID
        assert back.PixelData == orig.PixelData, path.name
        for padding in (back, orig):  # storescu drops Data Set Trailing Padding
            if (0xFFFC, 0xFFFC) in padding:
                del padding[0xFFFC, 0xFFFC]
        assert back == orig, path.name
    studies = {
        str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
        for p in first_sent.values()
    }
    counts = node.worklist.queries.counts_by_status()  # type: ignore[attr-defined]
    assert counts["receiving"] == len(studies)
    # Fake_MONOHR1.dcm repeats the SIIM file's SOP Instance UID: kept once (the first copy)
    assert node.store.stats.get("stored") == len(first_sent)
    assert node.store.stats.get("duplicate") == len(files) - len(refused) - len(first_sent)
    assert node.store.stats.get("rejected") == len(refused)
    assert len(list((node.storage / "quarantine").glob("*.dcm"))) == len(refused)
    # no temporary file is left behind
    assert not list(node.storage.rglob("*.tmp"))


def test_received_bytes_are_written_as_received(node: Node, tmp_path: Path) -> None:
    good = synthetic_cr(tmp_path / "good.dcm")
    ds = pydicom.dcmread(good)
    payload = dataset_bytes(good)
    status = send_raw(
        node.port,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        "1.2.840.10008.1.2.1",
        payload,
        tmp_path,
    )
    assert status == 0x0000
    stored = _spooled(node.storage)[str(ds.SOPInstanceUID)]
    assert dataset_bytes(stored) == payload


@needs_dcmtk
def test_repeated_instance_is_idempotent(node: Node, tmp_path: Path) -> None:
    path = synthetic_cr(tmp_path / "a.dcm")
    assert storescu(node.port, [path]).returncode == 0
    assert storescu(node.port, [path]).returncode == 0
    assert node.store.stats == {"stored": 1, "duplicate": 1}
    assert len(_spooled(node.storage)) == 1
    row = node.worklist.queries.list_worklist()  # type: ignore[attr-defined]
    assert len(row) == 1 and row[0]["num_instances"] == 1


@needs_dcmtk
def test_echo_and_allow_list(node: Node) -> None:
    assert echo(node.port, aet="ECHOSCU")
    assert not echo(node.port, aet="INTRUDER")
    assert echo(node.port, aet="HOSTED")  # AE@HOST entry, connecting from that host
    # still serving after a rejection
    assert echo(node.port, aet="ECHOSCU")


def test_host_restricted_entry_rejects_other_hosts(tmp_path: Path) -> None:
    settings = load_settings(None, {"allow_ae": ["PACS@10.255.255.1", "ANY"]})
    from dicom_node.net.policy import AccessPolicy

    policy = AccessPolicy(tuple(settings.allow_ae))
    assert policy.admits("PACS", "10.255.255.1")
    assert not policy.admits("PACS", "127.0.0.1")
    assert policy.admits("ANY", "127.0.0.1")
    assert AccessPolicy(()).admits("WHOEVER", "1.2.3.4")


@needs_dcmtk
def test_malformed_truncated_and_hostile_uid_are_refused(node: Node, tmp_path: Path) -> None:
    good = synthetic_cr(tmp_path / "good.dcm")
    ds = pydicom.dcmread(good)
    payload = dataset_bytes(good)
    sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    ts = "1.2.840.10008.1.2.1"
    outside_before = _all_files(tmp_path) - _all_files(node.storage)

    # truncated: the stream ends inside the pixel data
    status = send_raw(node.port, sop_class, sop_uid, ts, payload[: len(payload) - 1000], tmp_path)
    assert status == 0xC210
    # malformed: garbage after a valid start
    status = send_raw(node.port, sop_class, sop_uid, ts, payload[:64] + b"\xff" * 64, tmp_path)
    assert status == 0xC210
    # hostile SOP Instance UID in the request and the data set
    hostile = payload.replace(sop_uid.encode(), b"../../x".ljust(len(sop_uid), b"\x00"))
    status = send_raw(node.port, sop_class, "../../x", ts, hostile, tmp_path)
    assert status is not None and status != 0x0000
    # hostile Study Instance UID only
    study = str(ds.StudyInstanceUID).encode()
    hostile_study = payload.replace(study, b"../../y".ljust(len(study), b"\x00"))
    status = send_raw(node.port, sop_class, sop_uid, ts, hostile_study, tmp_path)
    assert status == 0xC210

    # nothing was spooled or recorded; the rejects are quarantined with a reason
    assert _spooled(node.storage) == {}
    assert node.worklist.queries.list_worklist() == []  # type: ignore[attr-defined]
    quarantined = sorted((node.storage / "quarantine").glob("*.dcm"))
    assert len(quarantined) >= 3
    reasons = " ".join(p.read_text() for p in (node.storage / "quarantine").glob("*.txt"))
    assert "UID grammar" in reasons and "ends" in reasons
    # nothing written outside the storage folder (the sender's temp files aside)
    assert not (node.storage.parent / "x").exists() and not (node.storage.parent / "y").exists()
    new_outside = {
        p for p in _all_files(tmp_path) - _all_files(node.storage) if not p.name.startswith("raw-")
    }
    assert new_outside == outside_before
    # and the next association still succeeds
    assert storescu(node.port, [good]).returncode == 0
    assert sop_uid in _spooled(node.storage)


def _receive(ctx: StoreContext, path: Path, pieces: int = 3) -> int:
    """Drive one IncomingInstance with a file's data set, in ``pieces`` fragments."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    payload = memoryview(dataset_bytes(path))
    incoming = IncomingInstance.open(
        ctx,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="T",
    )
    step = max(1, len(payload) // pieces)
    for start in range(0, len(payload), step):
        incoming.write(payload[start : start + step])
    return incoming.finish()


def test_disk_full_answers_out_of_resources(tmp_path: Path) -> None:
    """A write failure (here: the spool replaced by a file) gives 0xA700, not an exception."""
    good = synthetic_cr(tmp_path / "good.dcm")
    ds = pydicom.dcmread(good)
    recorded: list[str] = []

    def record(info: object, path: Path, size: int, ae: str) -> bool:
        recorded.append(str(path))
        return True

    ctx = StoreContext(storage=tmp_path / "storage", record=record)
    study_dir = ctx.spool / str(ds.StudyInstanceUID)
    study_dir.write_bytes(b"not a folder")  # mkdir of the series folder now fails
    assert _receive(ctx, good) == 0xA700
    assert recorded == []
    assert not list(ctx.incoming.iterdir())
    assert ctx.concurrent() == 0


def test_incoming_instance_is_written_as_received(tmp_path: Path) -> None:
    """The spooled file = our file meta + the data set bytes exactly as they arrived."""
    good = synthetic_cr(tmp_path / "good.dcm")
    ds = pydicom.dcmread(good)
    recorded: list[Path] = []

    def record(info: object, path: Path, size: int, ae: str) -> bool:
        recorded.append(path)
        return True

    ctx = StoreContext(storage=tmp_path / "storage", record=record)
    assert _receive(ctx, good, pieces=7) == 0x0000
    assert len(recorded) == 1 and recorded[0].is_file()
    stored = recorded[0].read_bytes()
    assert stored.endswith(dataset_bytes(good))
    back = pydicom.dcmread(recorded[0])
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert back.file_meta.SourceApplicationEntityTitle == "T"
    assert not list(ctx.incoming.iterdir())
    # a repeat keeps the first copy and is recorded again (idempotent)
    assert _receive(ctx, good) == 0x0000
    assert recorded[1] == recorded[0]
    # an instance whose association ended early leaves nothing behind
    partial = IncomingInstance.open(
        ctx, sop_class_uid="1.2.3", sop_instance_uid="1.2.4", transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="T",
    )  # fmt: skip
    partial.write(memoryview(b"\x08\x00\x16\x00"))
    partial.discard("test")
    assert not list(ctx.incoming.iterdir())
    assert ctx.concurrent() == 0


def test_scan_dataset_finds_uids_and_detects_truncation(dicom_dir: Path) -> None:
    for path in sorted(dicom_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        data = dataset_bytes(path)
        info = scan_dataset(data, ts)
        assert info.sop_instance_uid == ds.SOPInstanceUID
        assert info.study_uid == ds.StudyInstanceUID
        assert info.series_uid == ds.SeriesInstanceUID
        for cut in (len(data) - 1, len(data) // 2, 600):
            with pytest.raises(ImageReadError):
                scan_dataset(data[:cut], ts)
    with pytest.raises(TruncatedFileError):
        scan_dataset(b"\x08\x00", "1.2.840.10008.1.2.1")


@pytest.mark.parametrize(
    ("uid", "ok"),
    [
        ("1.2.840.10008.1.2", True),
        ("0.1", True),
        ("1.02", False),
        ("../../x", False),
        ("1..2", False),
        ("1.2.", False),
        ("1" * 65, False),
        ("", False),
    ],
)
def test_uid_grammar(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok


@needs_dcmtk
def test_group_commit_batches_parallel_associations(tmp_path: Path) -> None:
    """4 storescu processes at once: every instance stored and recorded, commits shared."""
    import subprocess

    from test_node_support import STORESCU, dcmtk_env

    storage = tmp_path / "storage"
    settings = load_settings(
        None, {"port": free_port(), "bind_address": "127.0.0.1", "storage": storage}
    )
    worklist = open_worklist(settings)
    committer = GroupCommitter(make_record_many(worklist))
    store = StoreContext(storage=storage, record=make_recorder(worklist), committer=committer)
    server = start_scp(settings, store)
    files = [synthetic_cr(tmp_path / f"f{i}.dcm", size=32, seed=i) for i in range(40)]
    try:
        procs = [
            subprocess.Popen(
                [
                    STORESCU,
                    "-aet",
                    "A",
                    "-aec",
                    "CXR_TRIAGE",
                    "127.0.0.1",
                    str(settings.port),
                    *map(str, files[k::4]),
                ],
                env=dcmtk_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for k in range(4)
        ]
        for proc in procs:
            assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        server.shutdown()
        committer.close()
    assert store.stats == {"stored": 40}
    # overlapping C-STOREs went through the group commit (lone ones commit in their thread)
    assert 0 < committer.items <= 40 and 1 <= committer.batches <= committer.items
    assert sum(r["num_instances"] for r in worklist.queries.list_worklist(limit=100)) == 40
    assert len(_spooled(storage)) == 40
    worklist.dispose()


def test_recovery_rerecords_lost_rows_and_removes_leftovers(tmp_path: Path) -> None:
    """A power cut may lose the last SQLite commits (synchronous=NORMAL), never the spooled
    files: every start re-records them from the spool paths and deletes what was never
    acknowledged (partial instances, interrupted writes)."""
    from dicom_node.ingest.recovery import recover_storage

    storage = tmp_path / "storage"
    spool = storage / "spool"
    paths = []
    for i in range(3):
        src = synthetic_cr(tmp_path / f"s{i}.dcm", size=32, seed=i)
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        target = spool / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        target.mkdir(parents=True)
        paths.append(src.rename(target / f"{ds.SOPInstanceUID}.dcm"))
    stale = paths[0].parent / ".x.dcm.deadbeef.tmp"
    stale.write_bytes(b"partial")
    (spool / ".incoming").mkdir()
    part = spool / ".incoming" / "0123.part"
    part.write_bytes(b"half an instance")
    (storage / "quarantine").mkdir()
    quarantine_tmp = storage / "quarantine" / ".q.txt.cafe.tmp"
    quarantine_tmp.write_bytes(b"x")
    (spool / "not-a-uid").mkdir()
    (storage / ".clean-shutdown").write_bytes(b"clean\n")  # an earlier version's marker
    settings = load_settings(None, {"storage": storage})
    worklist = open_worklist(settings)
    worklist.ingest.record_instance(
        paths[0].parent.parent.name, paths[0].stem, paths[0], series_uid=paths[0].parent.name
    )
    found = recover_storage(storage, worklist)
    assert (found.partials, found.temporaries, found.rerecorded) == (1, 2, 2)
    again = recover_storage(storage, worklist)  # idempotent
    assert (again.partials, again.temporaries, again.rerecorded) == (0, 0, 0)
    assert not stale.exists() and not part.exists() and not quarantine_tmp.exists()
    assert not (storage / ".clean-shutdown").exists()
    assert all(p.is_file() for p in paths)
    assert len(worklist.queries.list_worklist()) == 3
    # re-recorded rows carry SOP class and accession hash like those of live C-STOREs
    from triage_core.uids import hash_identifier

    for path in paths[1:]:
        detail = worklist.queries.study_detail(path.parent.parent.name)
        assert detail is not None
        assert detail["accession_hash"] == hash_identifier("ACC0001", "")
        assert [i["sop_class_uid"] for i in detail["images"]] == ["1.2.840.10008.5.1.4.1.1.1"]
    worklist.dispose()


def test_recovery_refuses_an_earlier_versions_journal(tmp_path: Path) -> None:
    """Segments of the removed receipt journal may hold acknowledged instances: refuse to start
    over them (clear message) instead of losing them; an empty journal folder just goes."""
    from dicom_node.ingest.recovery import recover_storage
    from triage_core.errors import ConfigError

    storage = tmp_path / "storage"
    (storage / "journal").mkdir(parents=True)
    (storage / "journal" / "segment-00000001.wal").write_bytes(b"CXRJ")
    worklist = open_worklist(load_settings(None, {"storage": storage}))
    try:
        with pytest.raises(ConfigError, match="receipt-journal segment"):
            recover_storage(storage, worklist)
        (storage / "journal" / "segment-00000001.wal").unlink()
        recover_storage(storage, worklist)
        assert not (storage / "journal").exists()
    finally:
        worklist.dispose()


@pytest.mark.parametrize(
    "name", ["receipt_journal", "journal_max_instance", "journal_batch_window"]
)
def test_removed_journal_settings_are_refused_clearly(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from triage_core.errors import ConfigError

    toml = tmp_path / "triage.toml"
    toml.write_text(f"{name} = 1\n")
    with pytest.raises(ConfigError, match=f"{name}.*the TOML file.*receipt journal was removed"):
        load_settings(toml)
    monkeypatch.setenv(f"TRIAGE_{name.upper()}", "1")
    with pytest.raises(ConfigError, match=f"TRIAGE_{name.upper()}"):
        load_settings(None)


def _fail_fsync(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[object]:
    """Make ``module.name`` (an fsync) fail with EIO, as after a lost write-back; returns the
    list of its calls' arguments."""
    import errno

    calls: list[object] = []

    def failing(arg: object) -> None:
        calls.append(arg)
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(module, name, failing)
    return calls


def test_failed_file_fsync_is_fatal_for_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync of the received file: 0xA700, the file removed (never renamed into the
    spool), never fsynced a second time, nothing recorded; the next C-STORE of the same
    instance succeeds into a fresh file."""
    import os

    from dicom_node.ingest import incoming as incoming_module

    good = synthetic_cr(tmp_path / "good.dcm")
    recorded: list[Path] = []

    def record(info: object, path: Path, size: int, ae: str) -> bool:
        recorded.append(path)
        return True

    ctx = StoreContext(storage=tmp_path / "storage", record=record)
    with monkeypatch.context() as patch:
        calls = _fail_fsync(patch, incoming_module.os, "fsync")
        assert _receive(ctx, good) == 0xA700
    assert len(calls) == 1, "the failed fsync was retried"
    assert recorded == [] and _spooled(ctx.storage) == {}
    assert not list(ctx.incoming.iterdir())
    assert ctx.stats == {"failed": 1}
    assert os.fsync is not None and _receive(ctx, good) == 0x0000
    assert len(recorded) == 1 and recorded[0].read_bytes().endswith(dataset_bytes(good))


def test_failed_folder_fsync_removes_the_renamed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync of the spool folder (the rename may not be durable): 0xA700 and the
    renamed file removed, nothing recorded, alone and through the group committer."""
    from dicom_node.ingest import incoming as incoming_module
    from dicom_node.ingest import spool as spool_module

    good = synthetic_cr(tmp_path / "good.dcm")
    recorded: list[object] = []

    def record(info: object, path: Path, size: int, ae: str) -> bool:
        recorded.append(path)
        return True

    ctx = StoreContext(storage=tmp_path / "storage", record=record)
    with monkeypatch.context() as patch:
        calls = _fail_fsync(patch, incoming_module, "fsync_dir")
        assert _receive(ctx, good) == 0xA700
    assert len(calls) == 1 and recorded == [] and _spooled(ctx.storage) == {}

    def record_many(items: list[object]) -> list[bool]:
        recorded.extend(items)
        return [True] * len(items)

    committer = GroupCommitter(record_many)
    ctx2 = StoreContext(storage=tmp_path / "storage2", record=record, committer=committer)
    ctx2.enter()  # another C-STORE in flight: this one goes through the committer
    try:
        with monkeypatch.context() as patch:
            _fail_fsync(patch, spool_module, "fsync_dir")
            assert _receive(ctx2, good) == 0xA700
    finally:
        ctx2.leave()
        committer.close()
    assert recorded == [] and _spooled(ctx2.storage) == {}


@needs_dcmtk
def test_serve_killed_right_after_its_answers_keeps_every_instance(tmp_path: Path) -> None:
    """SIGKILL of a real ``triage serve`` right after storescu got its success statuses: after a
    restart every acknowledged instance is in the spool (byte for byte) and the worklist, and
    what was never acknowledged (a partial instance) is gone."""
    from test_node_support import ServeProcess

    storage = tmp_path / "storage"
    port = free_port()
    args = [
        "serve", "--port", str(port), "--bind-address", "127.0.0.1", "--storage", str(storage),
        "--workers", "0", "--http-port", "0", "--stable-age", "3600",
    ]  # fmt: skip
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=64, seed=10 + i) for i in range(12)]
    serve = ServeProcess(args, tmp_path / "serve.log").start()
    try:
        serve.wait_ready(port)
        proc = storescu(port, files)
        assert proc.returncode == 0, proc.stderr
        serve.kill9()
        (storage / "spool" / ".incoming" / "cut.part").write_bytes(b"never acknowledged")
        serve = ServeProcess(args, tmp_path / "serve2.log").start()
        serve.wait_ready(port)
        assert "storage recovery: 1 partial instance(s)" in serve.log()
    finally:
        serve.stop()
    worklist = open_worklist(load_settings(None, {"storage": storage}))
    try:
        rows = worklist.queries.list_worklist(limit=100)
        assert sum(r["num_instances"] for r in rows) == len(files)
    finally:
        worklist.dispose()
    spooled = _spooled(storage)
    for path in files:
        ds = pydicom.dcmread(path)
        assert dataset_bytes(spooled[str(ds.SOPInstanceUID)]) == dataset_bytes(path)
    assert not list((storage / "spool" / ".incoming").iterdir())


@needs_dcmtk
def test_serve_killed_right_after_its_stow_rs_answers_keeps_every_instance(
    tmp_path: Path,
) -> None:
    """Issue 25's promise for STOW-RS: SIGKILL right after the Store Instances Responses (one
    request per instance, then one request for several) loses none of the acknowledged
    instances: after a restart each is in the spool byte for byte and in the worklist."""
    import httpx
    from test_node_support import ServeProcess

    storage = tmp_path / "storage"
    port, http_port = free_port(), free_port()
    args = [
        "serve", "--port", str(port), "--bind-address", "127.0.0.1", "--storage", str(storage),
        "--workers", "0", "--http-port", str(http_port), "--stable-age", "3600",
    ]  # fmt: skip
    files = [synthetic_cr(tmp_path / f"{i}.dcm", size=64, seed=40 + i) for i in range(9)]
    boundary = "kill-test"

    def body(paths: list[Path]) -> bytes:
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        parts = b"".join(head + p.read_bytes() + b"\r\n" for p in paths)
        return parts + f"--{boundary}--\r\n".encode()

    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    serve = ServeProcess(args, tmp_path / "serve.log").start()
    try:
        serve.wait_ready(port)
        url = f"http://127.0.0.1:{http_port}/dicomweb/studies"
        with httpx.Client(timeout=60) as client:
            answers = [client.post(url, content=body([f]), headers=headers) for f in files[:3]]
            answers.append(client.post(url, content=body(files[3:]), headers=headers))
        serve.kill9()  # at once: nothing after the answers may be needed to keep them
        assert [a.status_code for a in answers] == [200] * 4, answers[-1].text
        stored = [
            item["00081155"]["Value"][0] for a in answers for item in a.json()["00081199"]["Value"]
        ]
        assert len(stored) == len(files)
        serve = ServeProcess(args, tmp_path / "serve2.log").start()
        serve.wait_ready(port)
    finally:
        serve.stop()
    worklist = open_worklist(load_settings(None, {"storage": storage}))
    try:
        rows = worklist.queries.list_worklist(limit=100)
        assert sum(r["num_instances"] for r in rows) == len(files)
    finally:
        worklist.dispose()
    spooled = _spooled(storage)
    for path in files:
        ds = pydicom.dcmread(path)
        assert str(ds.SOPInstanceUID) in stored
        assert dataset_bytes(spooled[str(ds.SOPInstanceUID)]) == dataset_bytes(path)


def test_tcp_nodelay_on_accepted_and_requested_sockets(node: Node) -> None:
    import socket

    from pynetdicom import AE, evt

    from dicom_node.net.tuning import handle_conn_open

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title="CXR_TRIAGE",
        evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        ours = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert ours is not None
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        accepted = [a.sock for a in node.server.active_associations]
        assert accepted
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0 for s in accepted)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


@needs_dcmtk
def test_max_associations(tmp_path: Path) -> None:
    from pynetdicom import AE

    storage = tmp_path / "storage"
    settings = load_settings(
        None,
        {"port": free_port(), "bind_address": "127.0.0.1", "storage": storage,
         "max_associations": 1},
    )  # fmt: skip
    worklist = open_worklist(settings)
    server = start_scp(settings, StoreContext(storage=storage, record=make_recorder(worklist)))
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", settings.port, ae_title="CXR_TRIAGE")
        assert held.is_established
        assert not echo(settings.port)  # over the limit: rejected
        held.release()
        deadline = time.monotonic() + 10
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert echo(settings.port)
    finally:
        server.shutdown()
        worklist.dispose()


@needs_dcmtk
@pytest.mark.parametrize(
    ("flag", "syntax"),
    [
        ("-xd", "1.2.840.10008.1.2.1.99"),  # deflated
        ("-xi", "1.2.840.10008.1.2"),  # implicit little endian
    ],
)
def test_uncompressed_variants_are_stored_as_negotiated(
    node: Node, tmp_path: Path, flag: str, syntax: str
) -> None:
    import numpy as np

    path = synthetic_cr(tmp_path / "a.dcm", size=48, seed=7)
    proc = storescu(node.port, [path], extra=[flag, "-R"])
    assert proc.returncode == 0, proc.stderr
    ds = pydicom.dcmread(path)
    stored = pydicom.dcmread(_spooled(node.storage)[str(ds.SOPInstanceUID)])
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(stored.pixel_array, ds.pixel_array)
