"""TLS for the DICOM port and for destinations (PS3.15 Annex B, the BCP 195 TLS profiles).

TLS 1.2 or later only, with the AEAD cipher suites BCP 195 (RFC 9325) recommends for TLS 1.2
(ECDHE/DHE with AES-GCM or ChaCha20-Poly1305); TLS 1.3 suites are OpenSSL's defaults, all
AEAD. The SCP presents its certificate and, when a CA is given, requires and verifies the
client's (mutual authentication). The SCU always verifies the destination's certificate
against the destination's CA file, and its host name unless told otherwise.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from triage_core.errors import ConfigError

#: TLS 1.2 cipher suites (OpenSSL names): forward secrecy and AEAD only (BCP 195).
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _context(purpose: ssl._SSLMethod) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None, what: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: certificate {cert} / key {key} cannot be used: {exc}") from exc


def _load_ca(context: ssl.SSLContext, ca: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: CA file {ca} cannot be used: {exc}") from exc


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """The SCP's context; with ``ca`` a client certificate signed by it is required."""
    context = _context(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, cert, key, "tls_cert")
    if ca is not None:
        _load_ca(context, ca, "tls_ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: Path, cert: Path | None = None, key: Path | None = None, check_hostname: bool = True
) -> ssl.SSLContext:
    """An SCU's context: the peer must present a certificate signed by ``ca``; ``cert`` and
    ``key`` are ours, for a peer that requires client authentication."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT)
    _load_ca(context, ca, "destination tls_ca")
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        _load_chain(context, cert, key, "destination tls_cert")
    return context
