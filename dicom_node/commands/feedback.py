"""``triage feedback list`` and ``triage feedback export --out DIR``: readers' verdicts.

Both read the worklist ``triage serve`` uses (same ``--config`` / ``--storage`` / ``--db``) and
never create one. ``list`` prints the verdicts (all, or one study's with ``--study``) as a table
or JSON, notes only in JSON. ``export`` writes the studies with a final verdict as a training
set without PHI (:mod:`dicom_node.commands.feedback_export`: ``labels.csv`` in the NIH
Data_Entry_2017 format, ``images/``, ``provenance.csv``), ready for ``triage train --images
DIR/images --labels DIR/labels.csv``.

Exit status: 0 on success, 1 when the worklist cannot be read or the export cannot be written,
2 for invalid arguments or settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.commands.common import db_flags, dicom_uid, open_worklist, settings_from_args
from triage_core.errors import CommandError

if TYPE_CHECKING:
    from triage_core.worklist import Worklist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``list`` and ``export``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="the readers' verdicts")
    listing.add_argument("--study", metavar="UID", type=dicom_uid, help="one study only")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    db_flags(listing)
    export = sub.add_parser("export", help="studies with a final verdict as a training set")
    export.add_argument("--out", metavar="DIR", type=Path, required=True, help="a new folder")
    export.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="N",
        help="side of the square PNGs (default 256, the shared NIH training PNGs' size)",
    )
    db_flags(export)


def _list(worklist: Worklist, args: argparse.Namespace) -> int:
    if args.study is not None:
        uids = [args.study]
    else:
        uids = worklist.feedback.studies_with_verdicts()
    rows = [{"study_uid": uid, **v} for uid in uids for v in worklist.feedback.for_study(uid)]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("(no verdicts)")
        return 0
    header = ("AT", "USER", "FINDING", "VERDICT", "MODEL", "STUDY UID")
    lines = [
        (
            (r["at"] or "")[:19].replace("T", " "),
            r["user"],
            r["finding"],
            r["verdict"],
            f"{r['model']} {r['model_version']}".strip(),
            r["study_uid"],
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    for line in [header, *lines]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one action; see the module docstring for the exit status."""
    from triage_core.errors import WorklistError

    settings = settings_from_args(args)
    worklist = open_worklist(settings, create=False)
    try:
        if args.action == "list":
            return _list(worklist, args)
        from dicom_node.commands.feedback_export import ExportError, export_feedback
        from dicom_node.ingest.spool import installation_salt
        from triage_core.imaging import EXPORT_SIZE

        salt = installation_salt(settings.storage)
        size = EXPORT_SIZE if args.image_size is None else args.image_size
        try:
            summary = export_feedback(worklist, args.out, salt, size)
        except ExportError as exc:
            raise CommandError(str(exc)) from exc
        print(
            f"wrote {summary.images} images of {summary.studies} studies "
            f"({summary.patients} patients, {summary.skipped} images skipped) to {summary.out}: "
            "labels.csv, images/, provenance.csv"
        )
        return 0
    except WorklistError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        worklist.dispose()
