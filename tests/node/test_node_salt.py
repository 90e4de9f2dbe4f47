"""Identifier hashes are salted per installation, so guessable accession numbers stay hidden."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from dicom_node.handlers import phi_hash
from dicom_node.service import SALT_FILE, installation_salt
from triage_core.worklist import hash_identifier


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


def test_salted_hashes_differ_from_plain_sha256() -> None:
    accession = "A12345"
    plain = hashlib.sha256(accession.encode()).hexdigest()
    salted_log = phi_hash(accession, "secret")
    salted_row = hash_identifier(accession, "secret")
    assert not plain.startswith(salted_log)
    assert not plain.startswith(salted_row)
    assert phi_hash(accession, "secret") == salted_log  # stable for correlation
    assert phi_hash(accession, "other") != salted_log
    assert phi_hash("", "secret") == "-"
