"""A DICOMweb destination (STOW-RS) as the settings hold it; the client is :mod:`dicom_node.stowrs`.

Beside :class:`~dicom_node.settings.Destination` (``AE@HOST:PORT``, C-STORE), kept apart from
the client so that the settings (imported by the network layer) do not import the SCU.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

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
