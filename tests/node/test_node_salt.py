"""Identifier hashes are salted per installation, so guessable accession numbers stay hidden."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from dicom_node.ingest.scanner import HeaderInfo
from dicom_node.ingest.spool import SALT_FILE, StoreContext, installation_salt
from triage_core.uids import hash_identifier


def test_salt_is_created_once_private_and_per_installation(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = installation_salt(tmp_path / "a")
    again = installation_salt(tmp_path / "a")
    other = installation_salt(tmp_path / "b")
    assert first == again and len(first) == 32
    assert other != first
    mode = stat.S_IMODE((tmp_path / "a" / SALT_FILE).stat().st_mode)
    assert mode == 0o600


def test_salted_hashes_differ_from_plain_sha256(tmp_path: Path) -> None:
    """One identifier hash for rows and log lines, salted per installation."""
    accession = "A12345"
    plain = hashlib.sha256(accession.encode()).hexdigest()
    salted = hash_identifier(accession, "secret")
    assert not plain.startswith(salted)
    assert hash_identifier(accession, "secret") == salted  # stable for correlation
    assert hash_identifier(accession, "other") != salted
    ctx = StoreContext(storage=tmp_path, record=lambda *_: True, salt="secret")
    line = ctx.describe(HeaderInfo(accession_number=accession, patient_id=""))
    assert line == f"accession#={salted} patient#=-"  # the log shows the row's hash
    assert accession not in line
