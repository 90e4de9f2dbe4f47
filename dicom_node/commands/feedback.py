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
import sys
from pathlib import Path

from dicom_node.commands.common import db_flags, open_worklist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``list`` and ``export``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="the readers' verdicts")
    listing.add_argument("--study", metavar="UID", help="one study only")
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


def _list(worklist: object, args: argparse.Namespace, prog: str) -> int:
    from triage_core.uids import is_valid_uid
    from triage_core.worklist import Worklist

    assert isinstance(worklist, Worklist)
    if args.study is not None:
        if not is_valid_uid(args.study):
            print(
                f"{prog}: error: --study {args.study!r} is not a valid DICOM UID", file=sys.stderr
            )
            return 2
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
    from triage_core.worklist import Worklist

    prog = f"triage feedback {args.action}"
    worklist, status = open_worklist(args, prog, create=False)
    if not isinstance(worklist, Worklist):
        return status
    try:
        if args.action == "list":
            return _list(worklist, args, prog)
        from dicom_node.commands.feedback_export import ExportError, export_feedback
        from dicom_node.ingest.spool import installation_salt
        from dicom_node.settings import load_settings
        from triage_core.imaging import EXPORT_SIZE

        settings = load_settings(args.config, {"storage": args.storage, "db": args.db})
        salt = installation_salt(settings.storage)
        size = EXPORT_SIZE if args.image_size is None else args.image_size
        try:
            summary = export_feedback(worklist, args.out, salt, size)
        except ExportError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 1
        print(
            f"wrote {summary.images} images of {summary.studies} studies "
            f"({summary.patients} patients, {summary.skipped} images skipped) to {summary.out}: "
            "labels.csv, images/, provenance.csv"
        )
        return 0
    except WorklistError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        worklist.dispose()
