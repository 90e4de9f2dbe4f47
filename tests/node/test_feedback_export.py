"""``triage feedback export`` end to end, and no PHI leaves.

Real chest DICOM files, given distinctive names, IDs, dates and an institution, go to a real
``triage serve`` (DEBUG logging) with DCMTK ``dcmsend``; a reader gives verdicts through the HTTP
API (one with a note holding a name); ``triage -v feedback export`` writes the training set. The
test reads it with ``training.data.read_labels`` (the NIH loader ``triage train`` uses), checks
each PNG against the serving path, and finds none of the names, IDs, UIDs or dates anywhere in
the export (every byte of every file), the server's log or the export's output.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_node_e2e import wait_for
from test_node_support import ServeProcess, free_port, needs_dcmtk
from test_web_browser import dcmsend, wrap_png
from test_web_feedback import api, token_add

from dicom_node.commands.feedback_export import LABEL_HEADER, render_png
from dicom_node.ingest.spool import installation_salt
from triage_core.uids import hash_identifier

pytestmark = [
    needs_dcmtk,
    pytest.mark.skipif(not Path("/usr/bin/dcmsend").exists(), reason="DCMTK is not installed"),
]

PATIENT_ID = "QZXVORID4711"
OTHER_ID = "QZXVORID0815"
PHI = {
    "PatientName": "QZXVOR^ZAPHOD",
    "ReferringPhysicianName": "QZXVORREFERRER^DOC",
    "InstitutionName": "QZXVOR General Hospital",
    "AccessionNumber": "QZXVORACC",
    "PatientBirthDate": "19450317",
    "StudyDate": "20260102",
    "StudyTime": "101112",
    "PatientAge": "058Y",
    "PatientSex": "F",
}
NEEDLE = re.compile("QZXVOR|19450317|20260102", re.IGNORECASE)  # a bare year is in timestamps
NOTE = "QZXVOR note: called the ward"


def with_phi(source: Path, out: Path, patient_id: str, n: int) -> Path:
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.PatientID = patient_id
    ds.AccessionNumber = f"QZXVORACC{n}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def test_export_is_a_training_set_without_phi(
    tmp_path: Path, tiny_checkpoint: Path, dicom_dir: Path, cxr14_dir: Path
) -> None:
    from training.data import attach_images, index_images, read_labels, select_task

    nih = sorted((cxr14_dir / "full").glob("*.png"))
    sources = [
        dicom_dir / "RG1_UNCR.dcm",  # A: patient 1
        wrap_png(nih[0], tmp_path / "n0.dcm", 0),  # B: patient 2, all absent
        wrap_png(nih[1], tmp_path / "n1.dcm", 1),  # C: patient 1 again, one finding unsure
        wrap_png(nih[2], tmp_path / "n2.dcm", 2),  # D: patient 1 again
    ]
    ids = [PATIENT_ID, OTHER_ID, PATIENT_ID, PATIENT_ID]
    files = [with_phi(s, tmp_path / f"phi{i}.dcm", ids[i], i) for i, s in enumerate(sources)]
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files]
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]

    storage = tmp_path / "storage"
    reader = token_add(storage, "dr.reed", "reader")
    port, http_port = free_port(), free_port()
    args = [
        "-vv", "serve", "--port", str(port), "--bind-address", "127.0.0.1",
        "--storage", str(storage), "--model", str(tiny_checkpoint), "--stable-age", "1",
        "--http-port", str(http_port), "--threads", "1",
    ]  # fmt: skip
    serve = ServeProcess(args, tmp_path / "serve.log").start()
    try:
        serve.wait_ready(port)
        for path in files:
            dcmsend(port, [path])

        def all_done() -> bool:
            rows = {r["study_uid"]: r for r in api(http_port, "/api/worklist", reader)["items"]}
            return all(rows.get(u, {}).get("status") == "done" for u in uids)

        wait_for(all_done, 600, "every study processed", serve.log)
        findings = list(api(http_port, f"/api/studies/{uids[0]}", reader)["findings"])
        assert len(findings) == 3

        def judge(uid: str, verdicts: dict[str, str], note: str | None = None) -> None:
            for finding, verdict in verdicts.items():
                body = {"finding": finding, "verdict": verdict}
                if note:
                    body["note"] = note
                api(http_port, f"/api/studies/{uid}/feedback", reader, body)

        a, b, c = findings
        judge(uids[0], {a: "present", b: "absent", c: "absent", "Pneumothorax": "present"}, NOTE)
        judge(uids[1], {a: "absent", b: "absent", c: "absent"})
        judge(uids[2], {a: "present", b: "unsure", c: "absent"})  # not decided: left out
        judge(uids[3], {a: "absent", b: "present", c: "absent"})
    finally:
        serve.stop()

    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node", "-vv", "feedback", "export", "--storage",
         str(storage), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 images of 3 studies (2 patients, 0 images skipped)" in proc.stdout

    # the NIH format, read by the loader triage train uses
    header = (out / "labels.csv").read_text().splitlines()[0]
    assert header == (cxr14_dir / "labels.csv").read_text().splitlines()[0].rstrip(",")
    assert tuple(header.split(",")) == LABEL_HEADER
    records = read_labels(out / "labels.csv")
    salt = installation_salt(storage)
    patient = hash_identifier(PATIENT_ID, salt)
    by_labels = {r.labels: r for r in records}
    assert set(by_labels) == {
        tuple(sorted([a, "Pneumothorax"])),
        ("No Finding",),
        (b,),
    }
    first = by_labels[tuple(sorted([a, "Pneumothorax"]))]
    assert first.patient_id == patient.lstrip("0")
    assert first.image_index.startswith(patient + "_") and first.age == 58 and first.sex == "F"
    assert by_labels[(b,)].patient_id == first.patient_id  # same patient, same key: same fold
    assert sorted(r.follow_up for r in records if r.patient_id == first.patient_id) == [0, 1]
    assert by_labels[("No Finding",)].patient_id == hash_identifier(OTHER_ID, salt).lstrip("0")
    kept, paths = attach_images(records, index_images(out / "images"))
    assert len(kept) == 3
    task = select_task(kept, "multilabel")
    assert task.targets.shape == (3, 3) and task.targets.sum() == 2  # a, b once each

    # the pixels are the serving path's, at the training size
    spooled = next((storage / "spool").rglob(f"{sops[0]}.dcm"))
    again = tmp_path / "again.png"
    render_png(spooled, 256, again)
    exported = Image.open(out / "images" / first.image_index)
    assert exported.mode == "L" and exported.size == (256, 256)
    assert np.array_equal(np.asarray(exported), np.asarray(Image.open(again)))

    with open(out / "provenance.csv", newline="") as handle:
        provenance = list(csv.DictReader(handle))
    assert [p["Image Index"] for p in provenance] == [r.image_index for r in records]
    assert {p["Model"] for p in provenance} == {"random-test-model"}
    assert {p["Readers"] for p in provenance} == {"1"}
    assert {p["Study Hash"] for p in provenance} == {
        hash_identifier(u, salt) for u in (uids[0], uids[1], uids[3])
    }

    # no PHI: not in any byte of the export, the server's log or the export's output
    exported_files = [p for p in out.rglob("*") if p.is_file()]
    assert len(exported_files) == 5  # labels, provenance, three PNGs
    texts = {str(p): p.read_bytes().decode("latin-1") for p in exported_files}
    texts["serve.log"] = serve.log()
    texts["export output"] = proc.stdout + proc.stderr
    for where, text in texts.items():
        assert not NEEDLE.search(text), f"PHI in {where}: {NEEDLE.search(text)}"
        assert PATIENT_ID not in text and OTHER_ID not in text, where
        if where != "serve.log":  # the node's log names studies by UID (DESIGN.md 8)
            for uid in (*uids, *sops):
                assert uid not in text, f"{uid} in {where}"
    assert "feedback" in texts["serve.log"] or "verdict" in texts["serve.log"]
