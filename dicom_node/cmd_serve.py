"""``triage serve``: the DICOM node, scheduler, workers and HTTP API in one process.

:func:`build_node` assembles the components (:mod:`dicom_node.node`); :func:`run_node` is the
life cycle both ``serve`` and ``worker`` share.

Settings come from ``--config`` (TOML) < ``TRIAGE_*`` environment < flags. Invalid settings
(bad port, missing model, unreachable database, unwritable storage) print one clear line and
exit with status 2. SIGTERM / SIGINT stop the service gracefully.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.node import Node
    from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)

#: Exit status for invalid settings (argparse's convention for usage errors).
EXIT_CONFIG = 2


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``serve`` and ``worker`` (all default to ``None``: not given)."""
    parser.add_argument("--config", type=Path, help="TOML settings file (lowest precedence)")
    parser.add_argument("--storage", type=Path, help="storage folder (spool, outbox, SQLite)")
    parser.add_argument("--db", help="SQLAlchemy database URL (default: SQLite under --storage)")
    parser.add_argument("--model", type=Path, help="checkpoint NAME (NAME.safetensors + .json)")
    parser.add_argument(
        "--destination",
        action="append",
        dest="destinations",
        metavar="AE@HOST:PORT|URL",
        help="send SR and SC here: C-STORE to AE@HOST:PORT, or STOW-RS to a DICOMweb URL "
        "such as http://host:8042/dicom-web (repeatable)",
    )
    parser.add_argument("--workers", type=int, help="inference worker threads")
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "torch"),
        help="inference runtime (default onnxruntime: NAME.onnx, no torch needed)",
    )
    parser.add_argument("--device", help="torch device (cpu, cuda, cuda:0; --runtime torch)")
    parser.add_argument("--threads", type=int, help="inference CPU threads")
    parser.add_argument("--lease-seconds", type=float, help="processing lease (s)")
    parser.add_argument("--max-attempts", type=int, help="processing attempts before failed")
    parser.add_argument(
        "--log-phi",
        action="store_const",
        const=True,
        default=None,
        help="log patient identifiers in clear (default: UIDs and hashes only)",
    )


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


_FLAG_FIELDS = (
    "storage",
    "db",
    "model",
    "destinations",
    "workers",
    "device",
    "threads",
    "lease_seconds",
    "max_attempts",
    "log_phi",
    "ae_title",
    "port",
    "bind_address",
    "allow_ae",
    "stable_age",
    "http_port",
    "http_host",
    "max_associations",
    "runtime",
    "max_pdu_size",
    "network_timeout",
    "artim_timeout",
    "max_pending_connections",
    "accept_any_called_ae",
    "http_proxy_header",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "http_tls_cert",
    "http_tls_key",
    "http_tls_ca",
)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as settings field values."""
    return {
        name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name, None) is not None
    }


def quiet_default_logging(verbosity: int) -> None:
    """Without ``-v`` the CLI logs warnings only; a service logs its stages at INFO anyway."""
    if verbosity <= 0:
        for name in ("dicom_node", "triage_core"):
            logging.getLogger(name).setLevel(logging.INFO)
    if verbosity <= 1:
        # Alembic's INFO lines (one per plugin and per migration step) say what our own
        # "worklist schema: revision A -> B" line says once.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # "job skipped: maximum number of running instances reached" is expected when a
        # poll overlaps a slow one; it is not worth a warning line every 0.2 s.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)


def _command_path(name: str, fallback: str) -> str:
    """``name`` when it is on PATH, else the full path of the command (or ``fallback``)."""
    import shutil

    if shutil.which(name):
        return name
    beside = Path(sys.executable).parent / name  # the virtualenv's own script
    return str(beside) if beside.is_file() else fallback


def start_banner(settings: Any, model_path: Any) -> str:
    """What a person needs right after start: where we listen, how to send, where to look.

    The send line uses DCMTK's ``dcmsend`` (it proposes each file's own transfer syntax, so
    compressed files go as they are; ``storescu`` proposes only uncompressed ones unless told),
    calling our AE title (the called AE is checked). Commands are given with full paths where
    they are not on PATH.
    """
    host = "127.0.0.1" if settings.bind_address in ("0.0.0.0", "::") else settings.bind_address
    storage = Path(settings.storage).resolve()
    dcmsend = _command_path("dcmsend", "/usr/bin/dcmsend")
    triage = _command_path("triage", f"{sys.executable} -m dicom_node")
    lines = [
        f"cxr-triage is listening: DICOM AE {settings.ae_title} on port {settings.port}, "
        f"storage {storage}, model {model_path or 'none (no workers)'}",
        "Send a study with DCMTK (each file in its own transfer syntax; +sd +r for a folder):",
        f"  {dcmsend} -aec {settings.ae_title} {host} {settings.port} study/*.dcm",
    ]
    if settings.http_port:
        from dicom_node.web import base_url

        url = base_url(settings)
        lines.append(f"Worklist in a browser: {url}/   (API: {url}/docs, metrics: {url}/metrics)")
        if settings.http_token is not None:
            lines.append(
                "  open it once with ?token=<your http_token> (or send Authorization: Bearer)"
            )
    lines += [
        "Worklist in a shell:",
        f"  {triage} worklist --storage {storage}",
        "Stop with Ctrl-C.",
    ]
    return "\n".join(lines)


def build_node(settings: NodeSettings, model_path: Path | None) -> Node:
    """``triage serve``: jobs, the HTTP API, delivery, recovery and the DICOM port, then the
    outputs process and the model, which load in the background (``/healthz/ready`` tells when
    they are: not the C-ECHO answer)."""
    from dicom_node.api import HttpApi
    from dicom_node.jobs import Jobs, StableStudies, lease_job, purge_job
    from dicom_node.node import Node, open_parts, processing_components
    from dicom_node.processing import Processing
    from dicom_node.receiver import Receiver

    parts = open_parts(settings)
    worklist = parts.worklist
    jobs = [lease_job(settings, worklist)]
    if settings.retention_days:
        jobs.append(purge_job(settings, worklist))
    wakeups, delivery, *processing = processing_components(parts, model_path, background=True)
    workers = next((c for c in processing if isinstance(c, Processing)), None)
    readiness = workers.readiness if workers is not None else None
    receiver = Receiver(settings, worklist, parts.metrics)  # STOW-RS shares its receive path
    components = [
        wakeups,
        StableStudies(settings, worklist, parts.wakeups),
        Jobs(jobs),
        HttpApi(
            settings, worklist, parts.metrics, store=lambda: receiver.store, readiness=readiness
        ),
        delivery,
        receiver,  # recovery, then the DICOM port: a C-ECHO answer means listening, not ready
        *processing,  # then the outputs process and the model load in the background
    ]
    return Node("serve", parts, components, stop_first=[receiver])


def run_node(
    args: argparse.Namespace,
    command: str,
    build: Callable[[NodeSettings, Path | None], Node],
    *,
    need_scp: bool,
) -> int:
    """Load settings, check them, build the node with ``build``, start it, wait for a signal."""
    from dicom_node.preflight import check_runtime
    from dicom_node.settings import load_settings
    from triage_core.errors import ConfigError, TriageError

    quiet_default_logging(getattr(args, "verbose", 0))
    try:
        settings = load_settings(args.config, overrides_from_args(args))
        model_path = check_runtime(settings, need_scp=need_scp, need_model=settings.workers > 0)
    except ConfigError as exc:
        print(f"triage {command}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from dicom_node.logsafe import set_show_phi

    set_show_phi(settings.log_phi)
    stop_requested = threading.Event()
    node: Node | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        stop_requested.set()
        if node is not None:
            node.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node = build(settings, model_path)
        node.start()
    except (TriageError, OSError) as exc:
        print(f"triage {command}: error: cannot start: {exc}", file=sys.stderr)
        if node is not None:
            node.stop()
        return EXIT_CONFIG if isinstance(exc, ConfigError | OSError) else 1
    if need_scp:
        print(start_banner(settings, model_path), flush=True)
    if stop_requested.is_set():
        node.request_stop()
    try:
        node.wait()
    finally:
        node.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    return run_node(args, "serve", build_node, need_scp=True)
