"""Named HTTP access tokens with a role (``viewer``, ``reader``, ``admin``), hashes stored only.

``triage token add NAME --role ROLE`` calls :meth:`Tokens.add`, which makes a random token
(:func:`secrets.token_urlsafe`, 256 bits), stores its SHA-256 and returns the token once; it
cannot be shown again. :meth:`Tokens.lookup` answers "whose token is this?" for the HTTP access
check by hashing what a request carries and looking the hash up. A plain (unsalted, fast) hash is
enough here: the tokens are random 256-bit strings, not passwords a person chose, so there is no
dictionary to run against a stolen table and nothing a slow KDF would add but latency on every
request. :meth:`Tokens.revoke` keeps the row (who was who stays readable next to the verdicts)
and makes the token unusable; adding the same name again gives it a new token.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select, update

from triage_core.errors import WorklistError
from triage_core.worklist.database import Database
from triage_core.worklist.records import check_name, iso, timestamp

#: Roles, weakest first: each may do what the ones before it may.
ROLES: tuple[str, ...] = ("viewer", "reader", "admin")
#: Longest token text looked up (ours are 43 characters; longer input is refused unhashed).
MAX_TOKEN_LENGTH = 256


def token_hash(token: str) -> str:
    """SHA-256 of the token's UTF-8 bytes, 64 hex digits."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def role_at_least(role: str | None, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (``None``: an anonymous viewer)."""
    have = ROLES.index(role) if role in ROLES else -1
    return have >= ROLES.index(needed)


@dataclass(frozen=True)
class TokenInfo:
    """One token row, without its hash."""

    name: str
    role: str
    created_at: str | None
    revoked_at: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Tokens:
    """The ``api_tokens`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, name: str, role: str, now: float | None = None) -> str:
        """Create a token for ``name`` with ``role``; returns the token (shown once).

        Raises
        ------
        WorklistError
            For a bad name or role, or a name that already has an active token.
        """
        check_name(name)
        if role not in ROLES:
            raise WorklistError(f"role {role!r} is not one of {', '.join(ROLES)}")
        token = secrets.token_urlsafe(32)
        ts = timestamp(now)
        t = self._db.tables.tokens
        with self._db.write() as conn:
            row = conn.execute(select(t.c.revoked_at).where(t.c.name == name)).first()
            if row is not None and row.revoked_at is None:
                raise WorklistError(
                    f"user {name!r} already has a token (triage token revoke {name} first)"
                )
            values = {"role": role, "token_hash": token_hash(token), "created_at": ts}
            if row is None:
                conn.execute(t.insert().values(name=name, revoked_at=None, **values))
            else:
                conn.execute(update(t).where(t.c.name == name).values(revoked_at=None, **values))
        return token

    def revoke(self, name: str, now: float | None = None) -> bool:
        """Make ``name``'s token unusable; ``False`` when there is no active one."""
        t = self._db.tables.tokens
        with self._db.write() as conn:
            done = conn.execute(
                update(t)
                .where(t.c.name == name, t.c.revoked_at.is_(None))
                .values(revoked_at=timestamp(now))
            )
        return bool(done.rowcount)

    def list(self) -> list[TokenInfo]:
        """Every token row (revoked ones too), by name."""
        t = self._db.tables.tokens
        with self._db.read() as conn:
            rows = conn.execute(select(t).order_by(t.c.name)).all()
        return [TokenInfo(r.name, r.role, iso(r.created_at), iso(r.revoked_at)) for r in rows]

    def lookup(self, token: str) -> tuple[str, str] | None:
        """``(name, role)`` of an active token, or ``None``."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        t = self._db.tables.tokens
        with self._db.read() as conn:
            row = conn.execute(
                select(t.c.name, t.c.role).where(
                    t.c.token_hash == token_hash(token), t.c.revoked_at.is_(None)
                )
            ).first()
        return None if row is None else (str(row.name), str(row.role))

    def role_of(self, name: str) -> str | None:
        """The role of ``name``'s active token (``None``: no active token)."""
        t = self._db.tables.tokens
        with self._db.read() as conn:
            found = conn.execute(
                select(t.c.role).where(t.c.name == name, t.c.revoked_at.is_(None))
            ).scalar()
        return None if found is None else str(found)

    def active_count(self) -> int:
        """Number of usable tokens."""
        t = self._db.tables.tokens
        with self._db.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(t).where(t.c.revoked_at.is_(None))
                ).scalar_one()
            )
