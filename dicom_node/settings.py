"""Typed settings of the DICOM node: TOML file < ``TRIAGE_*`` environment < command-line flags.

:class:`NodeSettings` is built once, in the CLI entry point (``triage serve`` / ``triage worker``),
with :func:`load_settings`, and then passed down as a typed object. Nothing here is built at import
time. Values are validated when the object is built (types, ranges, ``AE@HOST:PORT`` syntax); the
checks that touch the outside world (storage writable, model files present, database reachable,
port bindable) are in :mod:`dicom_node.preflight`, which the service runs once at start. Every
problem is raised as :class:`~triage_core.errors.ConfigError` with a message naming the setting.

Example TOML (top-level keys, the same names as the fields below)::

    ae_title = "CXR_TRIAGE"
    port = 11112
    storage = "/var/lib/cxr-triage"
    destinations = ["PACS@10.0.0.5:104"]
    allow_ae = ["MODALITY1", "PACS@10.0.0.5"]

Environment variables use the ``TRIAGE_`` prefix (``TRIAGE_PORT=11112``); list values are either
comma-separated (``TRIAGE_DESTINATIONS=PACS@host:104,VIEWER@host2:11112``) or a JSON list.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dicom_node.destinations import (
    Destination,
    DicomwebDestination,
    check_ae_title,
    parse_destination,
)
from dicom_node.net import limits
from triage_core.errors import ConfigError

logger = logging.getLogger(__name__)


class AllowedPeer(BaseModel):
    """An entry of the calling-AE allow-list: ``AE`` or ``AE@HOST`` (host optional)."""

    model_config = ConfigDict(frozen=True)

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedPeer:
        ae, sep, host = text.strip().partition("@")
        if sep and not host:
            raise ValueError(f"allowed AE {text!r}: empty host after '@'")
        return cls(ae_title=ae, host=host.strip("[]") or None)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "allowed AE title")

    def matches(self, ae_title: str, host: str) -> bool:
        """Whether a requestor with ``ae_title`` connecting from ``host`` is this peer."""
        return ae_title.strip() == self.ae_title and (
            self.host is None or _same_host(self.host, host)
        )

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


def _same_host(configured: str, peer_ip: str) -> bool:
    if configured == peer_ip:
        return True
    try:
        infos = socket.getaddrinfo(configured, None)
    except OSError:
        return False
    return any(info[4][0] == peer_ip for info in infos)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_ORIGIN = re.compile(
    r"(https?)://([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::(\d{1,5}))?"
)


def check_origin(text: str) -> str:
    """A CORS origin as browsers send it (``scheme://host[:port]``, lower case, no default
    port); ``*``, ``null``, paths and other schemes are refused."""
    origin = text.strip().lower()
    if origin in ("*", "null"):
        raise ValueError(
            f"cors_allow_origins: {text!r} is not allowed: requests carry credentials, so each "
            "origin must be named (https://viewer.example.org)"
        )
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        raise ValueError(
            f"cors_allow_origins: {text!r} is not an origin (http[s]://host[:port], no path, "
            "no trailing slash)"
        )
    scheme, host, port = match.groups()
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"cors_allow_origins: {text!r} has port {port}, not 1-65535")
    if port is None or int(port) == {"http": 80, "https": 443}[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


def _split_list(value: Any) -> Any:
    """Accept a list, a JSON list or a comma-separated string (environment variables)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list: {exc}") from exc
        return [part for part in (p.strip() for p in text.split(",")) if part]
    return value


def _parse_list(value: Any, parse: Callable[[str], Any]) -> Any:
    """:func:`_split_list`, then ``parse`` on each string item (typed items pass through)."""
    value = _split_list(value)
    if isinstance(value, list):
        return [parse(v) if isinstance(v, str) else v for v in value]
    return value


class NodeSettings(BaseSettings):
    """All settings of ``triage serve`` and ``triage worker``.

    Build it with :func:`load_settings` (TOML < environment < flags); constructing it directly
    reads only the environment and the keyword arguments.
    """

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_", extra="forbid", validate_default=True, frozen=True
    )

    ae_title: str = Field("CXR_TRIAGE", description="our AE title")
    port: int = Field(11112, ge=1, le=65535, description="DICOM listening port")
    bind_address: str = Field("0.0.0.0", description="address the DICOM port listens on")
    storage: Path = Field(Path("triage-storage"), description="spool, outbox, quarantine, SQLite")
    db: str | None = Field(None, description="SQLAlchemy URL; default SQLite under storage")
    model: Path | None = Field(None, description="checkpoint NAME (NAME.safetensors + NAME.json)")
    destinations: Annotated[list[Destination | DicomwebDestination], NoDecode] = Field(
        default_factory=list, description="AE@HOST:PORT (C-STORE) or a DICOMweb URL (STOW-RS)"
    )
    allow_ae: Annotated[list[AllowedPeer], NoDecode] = Field(default_factory=list)
    stable_age: float = Field(5.0, ge=0.0, le=86400.0, description="seconds without new images")
    workers: int = Field(1, ge=0, le=64, description="inference worker threads")
    http_host: str = Field("127.0.0.1")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP API port; 0 disables")
    max_associations: int = Field(16, ge=1, le=1000)
    max_pdu_size: int = Field(
        1 << 20,
        ge=limits.MIN_PDU,
        le=limits.MAX_PDU,
        description="maximum PDU length we receive (bytes); a longer P-DATA-TF is aborted",
    )
    network_timeout: float = Field(60.0, gt=0.0, description="DICOM network timeout (s)")
    artim_timeout: float = Field(
        10.0,
        gt=0.0,
        le=600.0,
        description="seconds a new connection has to complete its A-ASSOCIATE-RQ (PS3.8 ARTIM; "
        "the TLS handshake included)",
    )
    max_pending_connections: int = Field(
        32,
        ge=1,
        le=1000,
        description="connections not yet associated; the oldest is closed to admit a new one",
    )
    accept_any_called_ae: bool = Field(
        False, description="accept any called AE title (default: only ae_title)"
    )
    tls_cert: Path | None = Field(None, description="DICOM port over TLS: our certificate (PEM)")
    tls_key: Path | None = Field(None, description="private key of tls_cert (PEM)")
    tls_ca: Path | None = Field(
        None, description="CA file: clients must present a certificate it signed (mutual TLS)"
    )
    http_token: SecretStr | None = Field(
        None,
        description="access token every HTTP page and API call must carry (Authorization: "
        "Bearer, or the cookie the page's ?token= link sets); required when http_host is not a "
        "loopback address unless http_proxy_header is set",
    )
    http_proxy_header: str | None = Field(
        None,
        description="name of the header an authenticating reverse proxy sets (e.g. "
        "X-Forwarded-User): requests without it are refused; only the proxy may reach the port",
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="exact origins (scheme://host[:port]) of a viewer served elsewhere that may "
        "call /dicomweb with credentials (CORS); never '*'",
    )
    http_tls_cert: Path | None = Field(None, description="HTTP over TLS: our certificate (PEM)")
    http_tls_key: Path | None = Field(None, description="private key of http_tls_cert (PEM)")
    http_tls_ca: Path | None = Field(
        None, description="CA file: HTTP clients must present a certificate it signed"
    )
    dicomweb_max_body: int = Field(4 << 30, ge=1 << 16, description="largest STOW-RS body")
    dicomweb_max_part: int = Field(1 << 30, ge=1 << 12, description="largest STOW-RS part (bytes)")
    dicomweb_max_parts: int = Field(10000, ge=1, le=1_000_000, description="parts per STOW-RS")
    dicomweb_base_url: str = Field(
        "",
        description="the DICOMweb root as clients reach it through a reverse proxy (e.g. "
        "https://proxy.example.org/cxr/dicomweb): the base of the Retrieve URLs, BulkDataURIs "
        "and Content-Locations the node answers; empty: taken from each request's Host",
    )
    log_phi: bool = Field(False, description="log patient identifiers (default: UIDs only)")
    lease_seconds: float = Field(300.0, gt=0.0, description="processing lease of a worker")
    max_attempts: int = Field(3, ge=1, le=100, description="processing attempts before failed")
    delivery_max_attempts: int = Field(10, ge=1, le=1000)
    delivery_backoff: float = Field(2.0, gt=0.0, description="first retry delay (s), doubles")
    delivery_backoff_max: float = Field(600.0, gt=0.0)
    scheduler_interval: float = Field(
        0.2, gt=0.0, le=60.0, description="look-for-work period (s) without LISTEN/NOTIFY"
    )
    retention_days: float | None = Field(None, gt=0.0, description="purge spool after N days")
    runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="inference runtime: NAME.onnx in ONNX Runtime, or torch"
    )
    device: str = Field("cpu", description="torch device for inference (torch runtime)")
    threads: int | None = Field(
        None, ge=1, le=256, description="inference CPU threads (default: CPU count - 1)"
    )
    ort_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level"
    )
    ort_memory_arena: bool = Field(
        True, description="ONNX Runtime keeps freed activation memory for the next batch"
    )
    batch_size: int = Field(16, ge=1, le=1024)
    with_cam: bool = Field(True, description="send the Grad-CAM Secondary Capture")
    output_maps: Literal["both", "sc", "pm"] = Field(
        "both",
        description="how the Grad-CAM map is sent (with_cam): 'both' a Parametric Map (the map "
        "as values, IHE AI Results) and a Secondary Capture (the picture, for viewers that "
        "cannot overlay a map), 'pm' or 'sc' only one of them",
    )
    sc_max_side: int = Field(
        512,
        ge=0,
        le=65535,
        description="longest side (pixels) of the Grad-CAM Secondary Capture, aspect ratio kept; "
        "0 keeps the source image's size (the 128 px model's map is a 4 x 4 grid: 512 px is "
        "4x what the model saw, and 0.75 MB instead of 10-20 MB per CR-sized overlay)",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "NORMAL",
        description="SQLite commit durability; NORMAL relies on the fsynced spool files as the "
        "journal (every start re-records spooled instances whose rows a power cut took back)",
    )
    tcp_nodelay: bool = Field(
        True, description="disable Nagle on DICOM sockets (off only to measure its effect)"
    )
    spool_fsync: bool = Field(
        True, description="fsync spooled files before answering (turn off for benchmarks only)"
    )

    @model_validator(mode="after")
    def _tls(self) -> NodeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca (client authentication) needs tls_cert and tls_key")
        return self

    @model_validator(mode="after")
    def _http_access(self) -> NodeSettings:
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("http_tls_cert and http_tls_key go together")
        if self.http_tls_ca is not None and self.http_tls_cert is None:
            raise ValueError("http_tls_ca (client authentication) needs http_tls_cert")
        if self.http_token is not None and len(self.http_token.get_secret_value()) < 16:
            raise ValueError("http_token must be at least 16 characters")
        if self.http_proxy_header is not None and not re.fullmatch(
            r"[A-Za-z0-9-]{1,64}", self.http_proxy_header
        ):
            raise ValueError(f"http_proxy_header {self.http_proxy_header!r} is not a header name")
        open_to_network = self.http_port and not is_loopback(self.http_host)
        if open_to_network and self.http_token is None and self.http_proxy_header is None:
            raise ValueError(
                f"http_host {self.http_host!r} is not a loopback address: set http_token "
                "(TRIAGE_HTTP_TOKEN, at least 16 characters) or http_proxy_header, or keep "
                "http_host = 127.0.0.1"
            )
        return self

    @field_validator("sc_max_side")
    @classmethod
    def _sc_side(cls, value: int) -> int:
        if 0 < value < 64:
            raise ValueError("must be 0 (source size) or at least 64 pixels")
        return value

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "ae_title")

    @field_validator("dicomweb_base_url")
    @classmethod
    def _dicomweb_base(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        bad = f"{value[:100]!r} is not an http(s) URL without query or user (or empty)"
        if len(value) > 2048 or any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value):
            raise ValueError(bad)
        url = urllib.parse.urlsplit(value)
        try:
            url.port  # noqa: B018 - raises ValueError on a port that is not a number in range
        except ValueError:
            raise ValueError(bad) from None
        if url.scheme not in ("http", "https") or not url.hostname or url.username is not None:
            raise ValueError(bad)
        if url.query or url.fragment or value.endswith(("?", "#")):
            raise ValueError(bad)
        return value.rstrip("/")

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        return _parse_list(value, parse_destination)

    @field_validator("allow_ae", mode="before")
    @classmethod
    def _allow(cls, value: Any) -> Any:
        return _parse_list(value, AllowedPeer.parse)

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _cors(cls, value: Any) -> Any:
        return _parse_list(value, check_origin)

    @field_validator("db")
    @classmethod
    def _db(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(
                f"db {value!r} is not a SQLAlchemy URL (e.g. sqlite:///path/triage.db or "
                "postgresql+psycopg://user@host:5432/name)"
            )
        return value or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init) win over the environment; TOML values come in via load_settings.
        return init_settings, env_settings

    def destination(self, text: str) -> Destination | DicomwebDestination:
        """The configured destination written ``text`` (``AE@HOST:PORT`` or a URL, as delivery
        rows store it), with its TLS settings and token; a destination no longer configured is
        parsed from the text (plain TCP, no token)."""
        for destination in self.destinations:
            if str(destination) == text:
                return destination
        return parse_destination(text)

    # ------------------------------------------------------------------ derived paths
    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL in use (SQLite under the storage folder by default)."""
        if self.db:
            return self.db
        from triage_core.worklist import Worklist

        return Worklist.sqlite_url(self.storage.resolve())

    @property
    def spool_dir(self) -> Path:
        return self.storage / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.storage / "outbox"

    @property
    def quarantine_dir(self) -> Path:
        return self.storage / "quarantine"

    def redacted_url(self) -> str:
        """The database URL with any password masked, for logs."""
        return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", self.database_url)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return f"invalid settings ({source}): " + "; ".join(parts)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a settings TOML file; a ``[triage]`` table is accepted as well as top-level keys."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    if isinstance(data.get("triage"), dict):
        data = data["triage"]
    return data


#: Settings that existed once and were removed: refused with the reason, wherever they are set.
REMOVED_SETTINGS: dict[str, str] = {
    name: "the receipt journal was removed: every C-STORE is made durable one way (fsync, "
    "rename, folder fsync, row commit; docs/durability.md); delete this setting"
    for name in ("receipt_journal", "journal_max_instance", "journal_batch_window")
}


def _refuse_removed(toml_data: Mapping[str, Any], flags: Mapping[str, Any]) -> None:
    for name, why in REMOVED_SETTINGS.items():
        env = f"TRIAGE_{name.upper()}"
        where = [
            w
            for w, present in (
                ("the TOML file", name in toml_data),
                ("the command line", name in flags),
                (f"the environment ({env})", env in os.environ),
            )
            if present
        ]
        if where:
            raise ConfigError(f"setting {name!r} in {' and '.join(where)}: {why}")


def load_settings(
    config: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> NodeSettings:
    """Build :class:`NodeSettings` with the precedence TOML < ``TRIAGE_*`` env < ``overrides``.

    Parameters
    ----------
    config : path, optional
        TOML file (top-level keys or a ``[triage]`` table).
    overrides : mapping, optional
        Values given on the command line; ``None`` values are ignored (flag not given).

    Raises
    ------
    ConfigError
        Unreadable TOML, unknown keys, or any invalid value; the message names the setting.
    """
    toml_data = read_toml(Path(config)) if config is not None else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    _refuse_removed(toml_data, flags)

    class _Layered(NodeSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, InitSettingsSource(settings_cls, toml_data)

    source = "flags, TRIAGE_* environment" + (f", {config}" if config is not None else "")
    try:
        layered = _Layered(**flags)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from exc
    except ValueError as exc:  # pydantic-settings' SettingsError on undecodable env values
        raise ConfigError(f"invalid settings ({source}): {exc}") from exc
    return layered
