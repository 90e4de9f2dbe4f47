"""``triage worker``: inference workers and deliveries only, against a shared database.

Run one per machine (or several per machine) next to a ``triage serve`` ingest node that shares
the PostgreSQL database and the storage folder. Each claims queued studies with a lease
(``FOR UPDATE SKIP LOCKED``), so every study is processed by exactly one worker; expired
leases and due deliveries are handled by whichever process gets to them first.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.cmd_serve import add_common_arguments, run_node

if TYPE_CHECKING:
    from dicom_node.node import Node
    from dicom_node.settings import NodeSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--ae-title", help="calling AE title used when sending results (default CXR_TRIAGE)"
    )


def build_node(settings: NodeSettings, model_path: Path | None) -> Node:
    """``triage worker``: outputs, workers, delivery and the expired-lease job (no port)."""
    from dicom_node.jobs import Jobs, lease_job
    from dicom_node.node import Node, open_parts, processing_components

    parts = open_parts(settings)
    components = [
        *processing_components(parts, model_path),
        Jobs([lease_job(settings, parts.worklist)]),
    ]
    return Node("worker", parts, components)


def run(args: argparse.Namespace) -> int:
    return run_node(args, "worker", build_node, need_scp=False)
