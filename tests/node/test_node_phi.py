"""No patient data in any log line unless ``--log-phi``: a real study, with distinctive patient,
physician and operator names, through a real association, processing (SR and SC built by
highdicom in the outputs process) and delivery, with the server at DEBUG."""

from __future__ import annotations

import io
import logging
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from test_node_support import (
    ServeProcess,
    free_port,
    needs_dcmtk,
    storescp_destination,
    storescu,
    synthetic_cr,
)

from dicom_node import logsafe

#: Single-component names: highdicom warns about each one, quoting it.
NAMES = {
    "PatientName": "QZXVORPATIENT",
    "ReferringPhysicianName": "QZXVORREFERRER",
    "PerformingPhysicianName": "QZXVORPERFORMER",
    "OperatorsName": "QZXVOROPERATOR",
}
#: Also looked for: the name parts, case-insensitively (a lowercase or split copy is a leak too).
NEEDLE = re.compile("QZXVOR", re.IGNORECASE)


def _study(folder: Path) -> list[Path]:
    from pydicom.uid import generate_uid

    study_uid = generate_uid()
    folder.mkdir(parents=True)
    files = []
    for i, view in enumerate(("PA", "LL")):
        path = synthetic_cr(folder / f"{i}.dcm", study_uid=study_uid, seed=i, view=view, size=96)
        ds = pydicom.dcmread(path)
        for keyword, name in NAMES.items():
            setattr(ds, keyword, name)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@needs_dcmtk
def test_names_never_reach_the_log_at_debug(tmp_path: Path, tiny_checkpoint: Path) -> None:
    files = _study(tmp_path / "study")
    port, dest_port = free_port(), free_port()
    storage = tmp_path / "storage"
    args = [
        "-vv", "serve", "--port", str(port), "--bind-address", "127.0.0.1",
        "--storage", str(storage), "--model", str(tiny_checkpoint), "--stable-age", "1",
        "--http-port", "0", "--destination", f"PACS@127.0.0.1:{dest_port}", "--threads", "1",
        "--workers", "1",
    ]  # fmt: skip
    log_path = tmp_path / "serve.log"
    out = tmp_path / "pacs"
    with storescp_destination(out, dest_port):
        serve = ServeProcess(args, log_path).start()
        try:
            serve.wait_ready(port)
            proc = storescu(port, files)
            assert proc.returncode == 0, proc.stderr
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                received = [pydicom.dcmread(p) for p in out.glob("*") if p.is_file()]
                modalities = sorted(str(ds.Modality) for ds in received)
                if modalities == ["OT", "OT", "SR"]:  # the SC and the PM are both OT
                    break
                time.sleep(0.25)
            else:
                raise AssertionError(f"no SR, SC and PM delivered\n{serve.log()[-4000:]}")
        finally:
            serve.stop()
    # the outputs carry the names (they are DICOM objects for the PACS, not logs)...
    assert any(str(ds.get("PatientName", "")) == NAMES["PatientName"] for ds in received)
    log = log_path.read_text(errors="replace")
    # ...the log saw the whole flow at DEBUG, highdicom's name warnings included, redacted
    assert " DEBUG " in log and "stage=delivered" in log, log[-4000:]
    assert "unlikely to represent the intended person name" in log, log[-4000:]
    assert logsafe.REDACTED in log
    leaks = [line for line in log.splitlines() if NEEDLE.search(line)]
    assert leaks == [], "\n".join(leaks[:10])


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A handler with the PHI filter on a private logger tree; warnings captured into it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logsafe.PhiFilter())
    loggers = [logging.getLogger(n) for n in ("highdicom", "dicom_node.test", "py.warnings")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    logsafe.capture_warnings()
    try:
        yield stream
    finally:
        logging.captureWarnings(False)
        logsafe.set_show_phi(False)
        for logger in loggers:
            logger.removeHandler(handler)
            logger.propagate = True
            logger.setLevel(logging.NOTSET)


def test_filter_redacts_library_lines_warnings_and_exception_texts(
    captured: io.StringIO,
) -> None:
    from highdicom.valuerep import check_person_name

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        check_person_name("QZXVORWARNED")  # warns, quoting the name
    logging.getLogger("highdicom").debug('copied "%s" [%s]', "QZXVORLIB", "QZXVORDUMP")
    own = logging.getLogger("dicom_node.test")
    own.warning("study %s failed: %s", "1.2.3", ValueError("bad name 'QZXVOREXC'"))
    own.warning("study %s failed: %s", "1.2.3", "ValueError: bad name 'QZXVORSTR'")
    value = "QZXVORTRACE"
    try:
        raise ValueError(f"bad value {value!r}")
    except ValueError:
        own.exception("study %s", "1.2.3")
    text = captured.getvalue()
    assert "unlikely to represent the intended person name" in text
    assert "study 1.2.3 failed" in text and 'File "' in text  # what is not data stays
    assert not NEEDLE.search(text), text


def test_log_phi_shows_them(captured: io.StringIO) -> None:
    logsafe.set_show_phi(True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        from highdicom.valuerep import check_person_name

        check_person_name("QZXVORSHOWN")
    assert "QZXVORSHOWN" in captured.getvalue()
