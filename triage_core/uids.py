"""The one DICOM UID validator and the one identifier hash of cxr-triage.

Every package (``dicom_node``, ``triage_core``, ``training``) checks UIDs and hashes identifiers
with these functions; there is no other copy.

Why our own validator and not pydicom's ``UID.is_valid``: pydicom 3.0 tests its pattern with
``re.match(r"^...$")``, and ``$`` also matches before a final newline, so ``UID("1.2.3\\n")``
counts as valid there. A UID from the network becomes a path component and a database key, so
ours matches the whole string (``re.fullmatch``), ASCII digits only.
"""

from __future__ import annotations

import hashlib
import re

from triage_core.errors import InvalidUIDError

__all__ = ["MAX_UID_LENGTH", "HASH_HEX_DIGITS", "check_uid", "hash_identifier", "is_valid_uid"]

#: Longest UID the standard allows (PS3.5 section 9.1).
MAX_UID_LENGTH = 64
#: Hex digits kept from the SHA-256 of an identifier (64 bits): short enough for a log line, long
#: enough that two accession numbers of one installation practically never collide. The
#: worklist's ``accession_hash`` column has always held 16, so stored rows stay comparable.
HASH_HEX_DIGITS = 16

# PS3.5 9.1: components of ASCII digits separated by ".", each "0" or without a leading zero.
# [0-9], not \d: \d would accept other scripts' digits.
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(uid: object) -> bool:
    """Whether ``uid`` is a string that follows the DICOM UID grammar (PS3.5 section 9.1).

    Digits and dots only, at least one component, no empty component, no leading zero in a
    component (``0`` alone is fine), at most 64 characters. Anything else (trailing newline,
    space or NUL padding, non-ASCII digits, ``None``, bytes) is invalid: callers strip DICOM's
    trailing NUL padding themselves, before asking.

    Parameters
    ----------
    uid : object
        The candidate; only a ``str`` can be valid.

    Returns
    -------
    bool
        ``True`` for a valid UID.
    """
    return (
        isinstance(uid, str)
        and 0 < len(uid) <= MAX_UID_LENGTH
        and _UID_RE.fullmatch(uid) is not None
    )


def check_uid(uid: str, what: str = "UID") -> str:
    """Return ``uid`` if it is valid (see :func:`is_valid_uid`), else raise.

    Parameters
    ----------
    uid : str
        The candidate.
    what : str
        What it is, for the message (e.g. ``"Study Instance UID"``).

    Returns
    -------
    str
        ``uid`` unchanged.

    Raises
    ------
    InvalidUIDError
        For an invalid UID; the message shows at most 80 characters of it, escaped.
    """
    if not is_valid_uid(uid):
        shown = uid[:80] if isinstance(uid, str) else uid
        raise InvalidUIDError(f"{what} {shown!r} breaks the DICOM UID grammar")
    return uid


def hash_identifier(value: str, salt: str = "") -> str:
    """A short, salted, non-reversible tag for an identifier (accession number, patient ID).

    ``sha256(salt + "\\0" + value)``, first :data:`HASH_HEX_DIGITS` hex digits. With the
    installation's secret ``salt`` a guessable identifier cannot be recovered by hashing
    candidates; the same value and salt always give the same tag, so log lines and worklist rows
    can be correlated without showing the identifier.

    Parameters
    ----------
    value : str
        The identifier. Unencodable characters (lone surrogates) are replaced, never an error.
    salt : str
        The installation's secret salt.

    Returns
    -------
    str
        16 lowercase hex digits, or ``""`` for an empty value (callers that log it may show
        ``hash_identifier(v, salt) or "-"``).
    """
    if not value:
        return ""
    data = f"{salt}\x00{value}".encode("utf-8", "replace")
    return hashlib.sha256(data).hexdigest()[:HASH_HEX_DIGITS]
