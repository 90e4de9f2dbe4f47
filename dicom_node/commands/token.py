"""``triage token add NAME --role ROLE``, ``triage token list``, ``triage token revoke NAME``.

Named HTTP access tokens (:mod:`triage_core.worklist.tokens`), stored in the worklist database
that ``triage serve`` uses with the same ``--config`` / ``--storage`` / ``--db``. ``add`` prints
the new token once on standard output (only its SHA-256 is stored: it cannot be shown again)
and creates the database when there is none yet, so tokens can be made before the first start.
A running server sees a new or revoked token within a few seconds.

Exit status: 0 on success, 1 when the database cannot be used or the name is unknown, 2 for
invalid arguments or settings.
"""

from __future__ import annotations

import argparse
import json
import sys

from dicom_node.commands.common import db_flags, open_worklist, settings_from_args
from triage_core.errors import CommandError

ROLES = ("viewer", "reader", "admin")  # triage_core.worklist.tokens.ROLES (SQLAlchemy-free here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``add``, ``list`` and ``revoke``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="make a token for a user (printed once)")
    add.add_argument("name", metavar="NAME", help="user name (letters, digits, . _ @ -)")
    add.add_argument(
        "--role",
        choices=ROLES,
        required=True,
        help="viewer: look; reader: also give feedback; admin: also manage",
    )
    db_flags(add)
    listing = sub.add_parser("list", help="the users and roles (never the tokens)")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    db_flags(listing)
    revoke = sub.add_parser("revoke", help="make a user's token unusable")
    revoke.add_argument("name", metavar="NAME")
    db_flags(revoke)


def run(args: argparse.Namespace) -> int:
    """Run one action; see the module docstring for the exit status."""
    from triage_core.errors import WorklistError

    prog = f"triage token {args.action}"
    worklist = open_worklist(settings_from_args(args), create=args.action == "add")
    try:
        if args.action == "add":
            token = worklist.tokens.add(args.name, args.role)
            print(token)
            print(
                f"{prog}: token of {args.name} ({args.role}) printed above; it is not stored and "
                "cannot be shown again. Open a page once with ?token=TOKEN, or send "
                "Authorization: Bearer TOKEN",
                file=sys.stderr,
            )
        elif args.action == "revoke":
            if not worklist.tokens.revoke(args.name):
                raise CommandError(f"{args.name!r} has no active token")
            print(f"revoked the token of {args.name}")
        else:
            rows = worklist.tokens.list()
            if args.format == "json":
                print(
                    json.dumps(
                        [
                            {
                                "name": t.name,
                                "role": t.role,
                                "created_at": t.created_at,
                                "revoked_at": t.revoked_at,
                            }
                            for t in rows
                        ],
                        indent=2,
                    )
                )
            elif not rows:
                print("(no tokens; the http_token setting, if set, is the user admin)")
            else:
                width = max(len(t.name) for t in rows)
                print(f"{'NAME'.ljust(width)}  ROLE    CREATED               REVOKED")
                for t in rows:
                    print(
                        f"{t.name.ljust(width)}  {t.role.ljust(6)}  {(t.created_at or '')[:19]}  "
                        f"{(t.revoked_at or '-')[:19]}"
                    )
    except WorklistError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        worklist.dispose()
    return 0
