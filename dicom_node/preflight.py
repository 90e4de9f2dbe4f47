"""Start-up checks of the DICOM node: everything in the settings that touches the outside world.

:func:`check_runtime` runs once, before ``triage serve`` / ``triage worker`` open anything: the
storage folder is created and proven writable, the model files (and the serving graph for ONNX
Runtime) exist and their spec reads, the database answers, every TLS file loads, and the DICOM
and HTTP ports can be bound. Each problem is a :class:`~triage_core.errors.ConfigError` naming the
setting, so a misconfigured node fails at once with one line instead of at the first study.
Validation of the values themselves (types, ranges, syntax) stays in :mod:`dicom_node.settings`.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path

from dicom_node.destinations import DicomwebDestination
from dicom_node.settings import NodeSettings
from triage_core.errors import ConfigError


def check_storage(storage: Path) -> None:
    """Create the storage layout and prove it is writable (raises ConfigError)."""
    try:
        for sub in ("spool", "outbox", "quarantine"):
            (storage / sub).mkdir(parents=True, exist_ok=True)
        probe = storage / f".write-test-{uuid.uuid4().hex}"
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"storage folder {storage} is not writable: {exc}") from exc


def check_model(model: Path | None, runtime: str = "torch") -> Path:
    """Resolve the checkpoint path (``NAME`` of ``NAME.safetensors`` + ``NAME.json``, and
    ``NAME.onnx`` for the ONNX Runtime)."""
    from triage_core.errors import CheckpointError
    from triage_core.models import default_checkpoint_path, read_spec
    from triage_core.runtime import export_command, onnx_path

    if model is None:
        try:
            base = default_checkpoint_path()
        except CheckpointError as exc:
            raise ConfigError(f"no --model given and no default checkpoint: {exc}") from exc
    else:
        base = model.with_suffix("") if model.suffix in (".safetensors", ".json") else model
    files = [base.with_suffix(".safetensors"), base.with_suffix(".json")]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ConfigError(f"model checkpoint {base}: missing file(s) {', '.join(missing)}")
    try:
        read_spec(base)  # a broken spec fails the start, not the background load
    except CheckpointError as exc:
        raise ConfigError(f"model checkpoint {base}: {exc}") from exc
    if runtime == "onnxruntime" and not onnx_path(base).is_file():
        raise ConfigError(
            f"model checkpoint {base} has no serving graph {onnx_path(base).name}: write it with "
            f"'{export_command(base)} --check-images DIR', or use --runtime torch"
        )
    return base


def check_database(url: str) -> None:
    """Connect once to the database (raises ConfigError naming the URL without password)."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    shown = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
    try:
        engine = sqlalchemy.create_engine(url)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise ConfigError(f"database URL {shown} is not usable: {exc}") from exc
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"database {shown} is unreachable: {exc.__class__.__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    finally:
        engine.dispose()


def check_port(host: str, port: int, what: str) -> None:
    """Bind-test a TCP port (raises ConfigError when it is in use or not allowed)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"{what} {host}:{port} cannot be used: {exc}") from exc


def check_tls(settings: NodeSettings, *, need_scp: bool = True) -> None:
    """Load every TLS certificate, key and CA once (raises ConfigError naming the file)."""
    from dicom_node.net.tls import client_context, server_context

    if need_scp and settings.tls_cert is not None and settings.tls_key is not None:
        server_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
    if need_scp and settings.http_port and settings.http_tls_cert and settings.http_tls_key:
        server_context(settings.http_tls_cert, settings.http_tls_key, settings.http_tls_ca)
    for destination in settings.destinations:
        if isinstance(destination, DicomwebDestination):
            for path in (destination.tls_ca, destination.tls_cert, destination.tls_key):
                if path is not None and not path.is_file():
                    raise ConfigError(f"destination {destination}: {path} is not a file")
        elif destination.tls_ca is not None:
            client_context(destination.tls_ca, destination.tls_cert, destination.tls_key)


def check_runtime(
    settings: NodeSettings, *, need_scp: bool = True, need_model: bool = True
) -> Path | None:
    """Check everything that touches the outside world; returns the resolved checkpoint path.

    Raises
    ------
    ConfigError
        Unwritable storage, missing model files, unreachable database, or a port in use.
    """
    check_storage(settings.storage)
    model_path = check_model(settings.model, settings.runtime) if need_model else None
    check_database(settings.database_url)
    check_tls(settings, need_scp=need_scp)
    if need_scp:
        check_port(settings.bind_address, settings.port, "DICOM port")
        if settings.http_port:
            check_port(settings.http_host, settings.http_port, "HTTP port")
    return model_path
