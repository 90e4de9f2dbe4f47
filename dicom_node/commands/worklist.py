"""``triage worklist``: print the priority worklist (or one study) as a table or JSON.

Reads the same settings as ``triage serve`` (``--config`` TOML < ``TRIAGE_*`` environment <
``--storage`` / ``--db`` flags) and opens the worklist read-only: it never creates a database.
Rows are ordered by effective priority (score plus the default aging rule of
``triage_core.priority``; ``--no-aging`` for the raw score) then arrival.

Exit status: 0 on success, 1 when the worklist cannot be read or the study is unknown, 2 for
invalid settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from triage_core.spec import PRIORITY_LEVELS
from triage_core.worklist import STUDY_STATUSES  # constants only: SQLAlchemy loads in run()

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags of ``triage worklist``."""
    parser.add_argument("--config", metavar="FILE", help="settings TOML (as for triage serve)")
    parser.add_argument("--storage", metavar="DIR", help="storage folder of the node")
    parser.add_argument(
        "--db", metavar="URL", help="SQLAlchemy URL (default: SQLite under the storage folder)"
    )
    parser.add_argument(
        "--status",
        action="append",
        choices=STUDY_STATUSES,
        help="only studies in this status (repeatable)",
    )
    parser.add_argument(
        "--min-priority",
        metavar="SCORE|LEVEL",
        help=f"minimum effective priority (number) or level ({', '.join(PRIORITY_LEVELS)})",
    )
    parser.add_argument("--limit", type=int, default=50, help="at most N rows (default 50)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--no-aging", action="store_true", help="order by the raw score (no waiting-time boost)"
    )
    parser.add_argument(
        "--study", metavar="UID", help="show one study in detail (JSON) instead of the list"
    )


def _fmt_score(value: float | None) -> str:
    return "-" if value is None else f"{value:5.1f}"


def _top_finding(findings: dict[str, dict[str, Any]]) -> str:
    if not findings:
        return "-"
    name, data = max(findings.items(), key=lambda kv: kv[1]["probability"])
    mark = "+" if data["present"] else "-"
    return f"{name} {data['probability']:.2f}{mark}"


#: Printed under the table: what its markers mean.
LEGEND = (
    "Legend: TOP FINDING is the most probable finding, '+' at or above its threshold (present), "
    "'-' below. DELIVERY per destination AE: objects sent/total, '+' all sent, '~' pending "
    "(retrying), '!' failed; '-' none (no destination, or no results yet)."
)


def _delivery(states: list[Any]) -> str:
    if not states:
        return "-"
    mark = {"sent": "+", "pending": "~", "failed": "!"}
    return " ".join(
        f"{d.destination.split('@')[0]}:{d.sent}/{d.total}{mark[d.state]}" for d in states
    )


def format_table(rows: list[dict[str, Any]], deliveries: dict[str, list[Any]] | None = None) -> str:
    """Render worklist rows as a fixed-width text table, then the legend line.

    ``deliveries``: per study UID, the per-destination states of
    :func:`dicom_node.web.views.delivery_states`.
    """
    if not rows:
        return "(no studies)"
    deliveries = deliveries or {}
    header = (
        "PRIO",
        "SCORE",
        "LEVEL",
        "STATUS",
        "DELIVERY",
        "TOP FINDING",
        "RECEIVED",
        "STUDY UID",
        "NOTE",
    )
    lines = [
        (
            _fmt_score(r["effective_priority"]),
            _fmt_score(r["priority_score"]),
            r["priority_level"] or "-",
            r["status"],
            _delivery(deliveries.get(r["study_uid"], [])),
            _top_finding(r["findings"]),
            (r["received_at"] or "-").replace("T", " ")[:19],
            r["study_uid"],
            ("LOW CONFIDENCE " if r.get("low_confidence") else "")
            + (r["reason"] or r["error"] or ""),
        )
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = []
    for line in [header, *lines]:
        out.append("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return "\n".join([*out, "", LEGEND])


def _min_priority(text: str | None) -> float | str | None:
    if text is None or text in PRIORITY_LEVELS:
        return text
    try:
        return float(text)
    except ValueError:
        return None


def run(args: argparse.Namespace) -> int:
    """Print the worklist; see the module docstring for the exit status."""
    from pathlib import Path

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from dicom_node.settings import load_settings
    from triage_core.errors import ConfigError, WorklistError
    from triage_core.uids import is_valid_uid
    from triage_core.worklist import Worklist

    prog = "triage worklist"
    if args.limit < 1:
        print(f"{prog}: error: --limit must be at least 1", file=sys.stderr)
        return 2
    min_priority = _min_priority(args.min_priority)
    if args.min_priority is not None and min_priority is None:
        print(
            f"{prog}: error: --min-priority {args.min_priority!r} is neither a number nor one of "
            f"{', '.join(PRIORITY_LEVELS)}",
            file=sys.stderr,
        )
        return 2
    if args.study is not None and not is_valid_uid(args.study):
        print(f"{prog}: error: --study {args.study!r} is not a valid DICOM UID", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config, {"storage": args.storage, "db": args.db})
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    url = settings.database_url
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        print(f"{prog}: error: invalid database URL: {exc}", file=sys.stderr)
        return 2
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        # opening a missing SQLite file would create an empty one: refuse instead
        db_file = Path(parsed.database)
        if not db_file.is_file():
            print(
                f"{prog}: error: no worklist at {db_file} (run `triage serve --storage "
                f"{settings.storage}` first, or give --storage / --db)",
                file=sys.stderr,
            )
            return 1
    aging: Any = None
    if not args.no_aging:
        from triage_core.priority import AgingRule

        aging = AgingRule()
    worklist = None
    try:
        worklist = Worklist(url)
        if args.study is not None:
            detail = worklist.queries.study_detail(args.study, aging=aging)
            if detail is None:
                print(f"{prog}: error: study {args.study} not found", file=sys.stderr)
                return 1
            print(json.dumps(detail, indent=2))
            return 0
        rows = worklist.queries.list_worklist(
            status=args.status, min_priority=min_priority, limit=args.limit, aging=aging
        )
        deliveries: dict[str, list[Any]] = {}
        if args.format == "table":
            from dicom_node.web.views import delivery_states

            deliveries = delivery_states(worklist, [r["study_uid"] for r in rows])
    except WorklistError as exc:
        print(f"{prog}: error: {settings.redacted_url()}: {exc}", file=sys.stderr)
        return 1
    finally:
        if worklist is not None:
            worklist.dispose()
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, deliveries))
    return 0
