"""``triage worklist``: print the priority worklist (or one study) as a table or JSON.

Reads the same settings as ``triage serve`` (``--config`` TOML < ``TRIAGE_*`` environment <
``--storage`` / ``--db`` flags) and opens the worklist read-only: it never creates a database.
Rows are ordered by effective priority (score plus the default aging rule of
``triage_core.priority``; ``--no-aging`` for the raw score) then arrival.

Exit status: 0 on success, 1 when the worklist cannot be read or the study is unknown, 2 for
invalid settings or arguments (``--limit``, ``--min-priority`` and ``--study`` are checked by
their argparse types).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from dicom_node.commands.common import (
    db_flags,
    dicom_uid,
    open_worklist,
    positive_int,
    priority_floor,
    settings_from_args,
)
from triage_core.errors import CommandError
from triage_core.spec import PRIORITY_LEVELS
from triage_core.worklist import STUDY_STATUSES  # constants only: SQLAlchemy loads in run()

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags of ``triage worklist``."""
    db_flags(parser)
    parser.add_argument(
        "--status",
        action="append",
        choices=STUDY_STATUSES,
        help="only studies in this status (repeatable)",
    )
    parser.add_argument(
        "--min-priority",
        metavar="SCORE|LEVEL",
        type=priority_floor,
        help=f"minimum effective priority (number) or level ({', '.join(PRIORITY_LEVELS)})",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=50, help="at most N rows (default 50)"
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--no-aging", action="store_true", help="order by the raw score (no waiting-time boost)"
    )
    parser.add_argument(
        "--study",
        metavar="UID",
        type=dicom_uid,
        help="show one study in detail (JSON) instead of the list",
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


def _delivery(states: list[dict[str, Any]]) -> str:
    if not states:
        return "-"
    mark = {"sent": "+", "pending": "~", "failed": "!"}
    return " ".join(
        f"{d['destination'].split('@')[0]}:{d['sent']}/{d['total']}{mark[d['state']]}"
        for d in states
    )


def format_table(
    rows: list[dict[str, Any]], deliveries: dict[str, list[dict[str, Any]]] | None = None
) -> str:
    """Render worklist rows as a fixed-width text table, then the legend line.

    ``deliveries``: per study UID, the per-destination states of
    :meth:`triage_core.worklist.queries.WorklistQueries.delivery_states`.
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


def run(args: argparse.Namespace) -> int:
    """Print the worklist; see the module docstring for the exit status."""
    from triage_core.errors import WorklistError

    settings = settings_from_args(args)
    worklist = open_worklist(settings, create=False, schema=False)  # read-only: no tables made
    aging: Any = None
    if not args.no_aging:
        from triage_core.priority import AgingRule

        aging = AgingRule()
    try:
        if args.study is not None:
            detail = worklist.queries.study_detail(args.study, aging=aging)
            if detail is None:
                raise CommandError(f"study {args.study} not found")
            print(json.dumps(detail, indent=2))
            return 0
        rows = worklist.queries.list_worklist(
            status=args.status, min_priority=args.min_priority, limit=args.limit, aging=aging
        )
        deliveries: dict[str, list[dict[str, Any]]] = {}
        if args.format == "table":
            deliveries = worklist.queries.delivery_states([r["study_uid"] for r in rows])
    except WorklistError as exc:
        raise CommandError(f"{settings.redacted_url()}: {exc}") from exc
    finally:
        worklist.dispose()
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, deliveries))
    return 0
