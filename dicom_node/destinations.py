"""Where results go, as the settings hold it, and what a send returns.

:class:`Destination` (``AE@HOST:PORT``, C-STORE; sent by :mod:`dicom_node.net.scu`),
:class:`DicomwebDestination` (a DICOMweb base URL, STOW-RS; sent by
:mod:`dicom_node.dicomweb.stowrs`), :func:`parse_destination` (either, from its text) and
:class:`SendResult` (the outcome of one file, whichever the protocol). A foundation module: the
settings and both clients import it, it imports neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


def check_ae_title(value: str, what: str) -> str:
    """``value`` stripped, if it is a valid AE title (PS3.5 AE VR); else ``ValueError``
    naming ``what``."""
    value = value.strip()
    if not value or not _AE_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid AE title (1-16 printable characters, no backslash)"
        )
    return value


class Destination(BaseModel):
    """A C-STORE destination for the SR and SC results, written ``AE@HOST:PORT``."""

    model_config = ConfigDict(frozen=True)

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls_ca: Path | None = Field(default=None, description="CA file: send over TLS, verify the peer")
    tls_cert: Path | None = Field(default=None, description="our client certificate (PEM)")
    tls_key: Path | None = Field(default=None, description="its private key (PEM)")
    tls_check_hostname: bool = Field(default=True, description="its certificate names its host")

    @model_validator(mode="after")
    def _tls(self) -> Destination:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"destination {self}: tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError(f"destination {self}: tls_cert needs tls_ca (TLS is on with tls_ca)")
        return self

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@HOST:PORT`` (IPv6 hosts in brackets: ``AE@[::1]:104``)."""
        match = re.fullmatch(r"\s*([^@]+)@(\[[^\]]+\]|[^:@]+):(\d+)\s*", text)
        if not match:
            raise ValueError(f"destination {text!r} must be written AE@HOST:PORT")
        ae, host, port = match.groups()
        return cls(ae_title=ae, host=host.strip("[]"), port=int(port))

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "destination AE title")

    def __str__(self) -> str:
        """``AE@HOST:PORT``: also the key of its delivery rows (TLS settings are looked up by it,
        :meth:`NodeSettings.destination`)."""
        return f"{self.ae_title}@{self.host}:{self.port}"


_URL = re.compile(r"https?://[A-Za-z0-9.\-_~]+(:\d{1,5})?(/[A-Za-z0-9.\-_~/%]*)?")


class DicomwebDestination(BaseModel):
    """A STOW-RS destination for the SR and SC results: a DICOMweb base URL.

    ``str()`` gives the URL (without a trailing ``/``): the key of its delivery rows, by which
    its token and TLS settings are found again (:meth:`NodeSettings.destination`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="DICOMweb base URL, e.g. http://pacs:8042/dicom-web")
    token: SecretStr | None = Field(default=None, description="bearer token for the server")
    tls_ca: Path | None = Field(default=None, description="CA file to verify HTTPS (else system)")
    tls_cert: Path | None = Field(default=None, description="our client certificate (PEM)")
    tls_key: Path | None = Field(default=None, description="its private key (PEM)")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if len(value) > 200 or not _URL.fullmatch(value):
            raise ValueError(
                f"DICOMweb destination {value[:80]!r} must be an http:// or https:// URL "
                "(host, optional port and path; no user name, query or fragment; 200 "
                "characters at most)"
            )
        return value

    @model_validator(mode="after")
    def _tls(self) -> DicomwebDestination:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"destination {self}: tls_cert and tls_key go together")
        https = self.url.startswith("https://")
        if not https and (self.tls_ca is not None or self.tls_cert is not None):
            raise ValueError(f"destination {self}: TLS settings need an https:// URL")
        return self

    @classmethod
    def parse(cls, text: str) -> DicomwebDestination:
        return cls(url=text)

    def __str__(self) -> str:
        return self.url


def is_dicomweb(text: str) -> bool:
    """Whether a destination written as text is a URL (else ``AE@HOST:PORT``)."""
    return text.strip().lower().startswith(("http://", "https://"))


def parse_destination(text: str) -> Destination | DicomwebDestination:
    """``AE@HOST:PORT`` (C-STORE) or ``http(s)://...`` (STOW-RS)."""
    return DicomwebDestination.parse(text) if is_dicomweb(text) else Destination.parse(text)


@dataclass(frozen=True)
class SendResult:
    """Outcome for one file: ``ok`` when the peer stored it (success or warning)."""

    path: Path
    status: int | None
    ok: bool
    message: str = ""
