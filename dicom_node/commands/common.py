"""What the ``triage`` subcommands share: flags, settings, opening the worklist, a node's life.

:func:`add_common_arguments` (the flags of ``serve`` and ``worker``) and
:func:`overrides_from_args` (the flags given, as settings values); :func:`db_flags` and
:func:`open_worklist` (the worklist of a node for ``token``, ``feedback`` and ``worklist``);
:func:`run_node` (settings, start-up checks, start, wait for a signal, stop) with
:func:`quiet_default_logging` and :func:`start_banner`. Command modules import this module and
never each other.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage_core.errors import CommandError

if TYPE_CHECKING:
    from dicom_node.node import Node
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist

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
        from dicom_node.web.server import base_url

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


def run_node(
    args: argparse.Namespace,
    build: Callable[[NodeSettings, Path | None], Node],
    *,
    need_scp: bool,
) -> int:
    """Load and check the settings, then run the node ``build`` makes until a signal.

    Raises
    ------
    CommandError
        Invalid settings (status 2), or the node cannot start (2 for settings and OS errors,
        else 1).
    """
    from dicom_node.logsafe import set_show_phi
    from dicom_node.node import StartError, run_until_signal
    from dicom_node.preflight import check_runtime
    from dicom_node.settings import load_settings
    from triage_core.errors import ConfigError

    quiet_default_logging(getattr(args, "verbose", 0))
    try:
        settings = load_settings(args.config, overrides_from_args(args))
        model_path = check_runtime(settings, need_scp=need_scp, need_model=settings.workers > 0)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from exc
    set_show_phi(settings.log_phi)

    def started() -> None:
        if need_scp:
            print(start_banner(settings, model_path), flush=True)

    try:
        run_until_signal(lambda: build(settings, model_path), started)
    except StartError as exc:
        cause = exc.__cause__
        status = EXIT_CONFIG if isinstance(cause, ConfigError | OSError) else 1
        raise CommandError(f"cannot start: {cause}", status) from exc
    return 0


def db_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--storage`` and ``--db``: a node's worklist, as ``triage serve`` finds it."""
    parser.add_argument("--config", metavar="FILE", help="settings TOML (as for triage serve)")
    parser.add_argument("--storage", metavar="DIR", help="storage folder of the node")
    parser.add_argument(
        "--db", metavar="URL", help="SQLAlchemy URL (default: SQLite under the storage folder)"
    )


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    """The settings of :func:`db_flags` (``--config`` < ``TRIAGE_*`` environment < flags).

    Raises
    ------
    CommandError
        Invalid settings (status 2).
    """
    from dicom_node.settings import load_settings
    from triage_core.errors import ConfigError

    try:
        return load_settings(args.config, {"storage": args.storage, "db": args.db})
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from exc


def open_worklist(settings: NodeSettings, *, create: bool, schema: bool = True) -> Worklist:
    """The worklist of ``settings``.

    Parameters
    ----------
    settings : NodeSettings
        Where the worklist is (``database_url``).
    create : bool
        Whether a missing SQLite file may be created; else it is an error (opening it would
        create an empty one).
    schema : bool
        Create missing tables and migrate (``False`` for a command that only reads).

    Raises
    ------
    CommandError
        An invalid URL (status 2), no worklist there or a database error (status 1).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from triage_core.errors import WorklistError
    from triage_core.worklist import Worklist

    url = settings.database_url
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise CommandError(f"invalid database URL: {exc}", EXIT_CONFIG) from exc
    if not create and parsed.get_backend_name() == "sqlite" and parsed.database:
        db_file = Path(parsed.database)
        if not db_file.is_file():
            raise CommandError(
                f"no worklist at {db_file} (run `triage serve --storage {settings.storage}` "
                "first, or give --storage / --db)"
            )
    try:
        worklist = Worklist(url)
        if schema:
            worklist.create_all()
    except WorklistError as exc:
        raise CommandError(f"{settings.redacted_url()}: {exc}") from exc
    return worklist


def positive_int(text: str) -> int:
    """``argparse`` type: a whole number of at least 1 (``--limit``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def dicom_uid(text: str) -> str:
    """``argparse`` type: a UID of the DICOM grammar (PS3.5 9.1: digits and dots, 64 at most)."""
    from triage_core.uids import is_valid_uid

    if not is_valid_uid(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid DICOM UID")
    return text


def priority_floor(text: str) -> float | str:
    """``argparse`` type of ``--min-priority``: an effective priority (a number) or a level."""
    from triage_core.spec import PRIORITY_LEVELS

    if text in PRIORITY_LEVELS:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a number nor one of {', '.join(PRIORITY_LEVELS)}"
        ) from None
