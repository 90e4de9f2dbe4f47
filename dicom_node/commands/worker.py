"""``triage worker``: inference workers and deliveries only, against a shared database.

Run one per machine (or several per machine) next to a ``triage serve`` ingest node that shares
the PostgreSQL database and the storage folder. Each claims queued studies with a lease
(``FOR UPDATE SKIP LOCKED``), so every study is processed by exactly one worker; expired
leases and due deliveries are handled by whichever process gets to them first.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dicom_node.commands.common import add_common_arguments, run_node

if TYPE_CHECKING:
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--ae-title", help="calling AE title used when sending results (default CXR_TRIAGE)"
    )


def run(args: argparse.Namespace) -> int:
    from dicom_node.node import build_worker_node

    return run_node(args, build_worker_node, need_scp=False)
