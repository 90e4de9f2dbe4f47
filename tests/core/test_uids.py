"""The one UID grammar (PS3.5 9.1) and the one identifier hash (triage_core.uids)."""

from __future__ import annotations

import hashlib

import pytest
from pydicom.uid import UID

from triage_core.errors import InvalidUIDError
from triage_core.uids import HASH_HEX_DIGITS, check_uid, hash_identifier, is_valid_uid

VALID = [
    "0",
    "0.0",
    "1.2",
    "1.2.840.10008.5.1.4.1.1.1",
    "2.25.329800735698586629295641978511506172918",
    "1." + "2" * 62,  # exactly 64 characters
    "1.0.10.100",
]

INVALID = [
    "",  # no component
    "1.2.3\n",  # trailing newline: pydicom's `$` lets this through
    "1.2.3\r",
    "\n1.2.3",
    "1.2.3\x00",  # NUL padding must be stripped by the caller first
    "1.2.3 ",
    " 1.2.3",
    "1..2",  # empty component
    ".1",
    "1.",
    "1.2.",
    ".",
    "01.2",  # leading zero
    "1.02",
    "1.2.00",
    "1.2.a",
    "1.2.-3",
    "1.2.+3",
    "1,2",
    "../etc",
    "1.2/3",
    "1.٢.3",  # Arabic-Indic digit: not ASCII
    "１.2",  # fullwidth digit
    "1." + "2" * 63,  # 65 characters
]


@pytest.mark.parametrize("uid", VALID)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert check_uid(uid, "SOP Instance UID") == uid


@pytest.mark.parametrize("uid", INVALID)
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError, match="Study Instance UID .* breaks the DICOM UID grammar"):
        check_uid(uid, "Study Instance UID")


def test_trailing_newline_is_the_case_pydicom_misses() -> None:
    # the reason we keep our own validator (see the module docstring); if pydicom fixes it,
    # this assertion fails and the docstring should be updated
    with pytest.warns(UserWarning):
        assert UID("1.2.3\n").is_valid
    assert not is_valid_uid("1.2.3\n")


@pytest.mark.parametrize("value", [None, 1.2, 12, b"1.2.3", ["1.2"]])
def test_non_strings_are_invalid(value: object) -> None:
    assert not is_valid_uid(value)


def test_check_uid_message_is_escaped_and_bounded() -> None:
    with pytest.raises(InvalidUIDError) as info:
        check_uid("9" * 500 + "\n", "UID")
    message = str(info.value)
    assert "\n" not in message and len(message) < 200


def test_hash_identifier_is_salted_stable_and_short() -> None:
    tag = hash_identifier("A12345", "secret")
    assert len(tag) == HASH_HEX_DIGITS == 16
    assert int(tag, 16) >= 0 and tag == tag.lower()
    assert hash_identifier("A12345", "secret") == tag
    assert hash_identifier("A12345", "other") != tag
    assert hash_identifier("A12346", "secret") != tag
    assert "A12345" not in tag
    assert not hashlib.sha256(b"A12345").hexdigest().startswith(tag)
    assert hash_identifier("", "secret") == ""


def test_hash_identifier_keeps_the_stored_format() -> None:
    # worklist rows written before triage_core.uids existed hold exactly this value
    expected = hashlib.sha256(b"s\x00ACC1").hexdigest()[:16]
    assert hash_identifier("ACC1", "s") == expected
    # the 12-digit log tags of old dicom_node logs are a prefix of the new tag
    assert hash_identifier("ACC1", "s").startswith(expected[:12])


def test_hash_identifier_never_raises_on_unencodable_text() -> None:
    tag = hash_identifier("A\ud800B", "s")  # a lone surrogate, as a broken decoder may give
    assert len(tag) == 16
