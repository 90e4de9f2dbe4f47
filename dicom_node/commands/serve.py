"""``triage serve``: the DICOM node, scheduler, workers and HTTP API in one process.

:func:`dicom_node.node.build_serve_node` assembles the components;
:func:`dicom_node.commands.common.run_node` is the life cycle ``serve`` and ``worker`` share.

Settings come from ``--config`` (TOML) < ``TRIAGE_*`` environment < flags. Invalid settings
(bad port, missing model, unreachable database, unwritable storage) print one clear line and
exit with status 2. SIGTERM / SIGINT stop the service gracefully.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.commands.common import add_common_arguments, run_node


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--ae-title", help="our AE title (default CXR_TRIAGE)")
    parser.add_argument("--port", type=int, help="DICOM port (default 11112)")
    parser.add_argument("--bind-address", help="DICOM listening address (default 0.0.0.0)")
    parser.add_argument(
        "--allow-ae",
        action="append",
        metavar="AE[@HOST]",
        help="calling AE allowed to associate (repeatable; none given = everyone)",
    )
    parser.add_argument("--stable-age", type=float, help="seconds without new instances (5)")
    parser.add_argument("--http-port", type=int, help="HTTP API port (0 disables; 8080)")
    parser.add_argument("--http-host", help="HTTP API address (default 127.0.0.1)")
    parser.add_argument("--max-associations", type=int, help="concurrent associations (16)")
    parser.add_argument("--max-pdu-size", type=int, help="largest PDU we receive (bytes)")
    parser.add_argument("--network-timeout", type=float, help="DICOM network timeout (s)")
    parser.add_argument("--artim-timeout", type=float, help="seconds to A-ASSOCIATE-RQ (10)")
    parser.add_argument("--max-pending-connections", type=int, help="not yet associated (32)")
    parser.add_argument(
        "--accept-any-called-ae",
        action="store_const",
        const=True,
        default=None,
        help="accept any called AE title (default: only --ae-title)",
    )
    parser.add_argument("--http-proxy-header", help="header an authenticating proxy sets")
    parser.add_argument("--tls-cert", type=Path, help="DICOM port over TLS: certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-ca", type=Path, help="CA file: DICOM clients must present a certificate it signed"
    )
    parser.add_argument("--http-tls-cert", type=Path, help="HTTP over TLS: certificate (PEM)")
    parser.add_argument("--http-tls-key", type=Path, help="private key of --http-tls-cert")
    parser.add_argument(
        "--http-tls-ca", type=Path, help="CA file: HTTP clients must present a certificate"
    )


def run(args: argparse.Namespace) -> int:
    from dicom_node.node import build_serve_node

    return run_node(args, build_serve_node, need_scp=True)
