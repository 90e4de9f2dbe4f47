"""The listening side: accepts connections and runs each :class:`~dicom_node.net.ulp.Association`
on its own thread, within the caps on pending connections and on associations."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING

from dicom_node.net import limits
from dicom_node.net.negotiation import Negotiator, supported_contexts
from dicom_node.net.ulp import Association, OpenInstance

if TYPE_CHECKING:
    from dicom_node.net.policy import AccessPolicy
    from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)


def limits_from_settings(settings: NodeSettings) -> limits.Limits:
    """The upper layer's bounds as configured (``dicom_node.net.limits`` holds the fixed ones)."""
    return limits.Limits(
        max_pdu=settings.max_pdu_size,
        artim_timeout=settings.artim_timeout,
        network_timeout=settings.network_timeout,
        max_associations=settings.max_associations,
        max_pending=settings.max_pending_connections,
    )


#: Seconds between two log lines about failed TLS handshakes from one host.
TLS_LOG_INTERVAL = 60.0


class StorageServer:
    """Listening socket + one thread per connection; the interface of pynetdicom's
    ``ThreadedAssociationServer`` that the service uses (``server_address``, ``shutdown``).

    Connections that have not associated yet are capped at ``max_pending_connections``: the
    oldest is evicted (closed) to make room for a new one, so a flood of idle connections
    cannot lock out a peer that associates at once, and holds at most that many threads and
    read buffers. Associations are capped at ``max_associations`` (A-ASSOCIATE-RJ).
    """

    def __init__(
        self,
        settings: NodeSettings,
        open_instance: OpenInstance,
        policy: AccessPolicy,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.limits = limits_from_settings(settings)
        self.open_instance = open_instance
        self.policy = policy
        self.ssl_context = ssl_context
        self.negotiate = Negotiator(supported_contexts(), self.limits.max_pdu)
        self._lock = threading.Lock()
        self._pending: dict[Association, None] = {}  # oldest first
        self._open: set[Association] = set()
        self._threads: set[threading.Thread] = set()
        self._evicted = 0
        self._evicted_logged_at = 0.0
        self._tls_log: dict[str, tuple[float, int]] = {}  # peer host -> (logged at, suppressed)
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((settings.bind_address, settings.port))
        self.socket.listen(max(64, self.limits.max_pending * 2))
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)

    def start(self) -> StorageServer:
        self._thread.start()
        return self

    @property
    def active_associations(self) -> list[Association]:
        """The associations accepted and not yet ended."""
        with self._lock:
            return list(self._open)

    @property
    def pending_connections(self) -> int:
        """Connections that have not associated yet."""
        with self._lock:
            return len(self._pending)

    def admit(self, association: Association) -> bool:
        """Sta2 -> Sta6 bookkeeping; False when ``max_associations`` are open (or evicted)."""
        with self._lock:
            if association not in self._pending:
                return False
            if len(self._open) >= self.limits.max_associations:
                return False
            del self._pending[association]
            self._open.add(association)
            return True

    def tls_failed(self, peer: str, reason: str) -> None:
        """Log a failed TLS handshake: the first from a host at once, then at most one line per
        :data:`TLS_LOG_INTERVAL` seconds per host, counting the ones not logged (a scanner or a
        misconfigured modality retrying every second must not flood the log)."""
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        with self._lock:
            logged_at, suppressed = self._tls_log.get(host, (-TLS_LOG_INTERVAL, 0))
            if now - logged_at < TLS_LOG_INTERVAL:
                self._tls_log[host] = (logged_at, suppressed + 1)
                return
            if len(self._tls_log) >= 1024:  # bounded: forget the hosts logged longest ago
                for old in sorted(self._tls_log, key=lambda h: self._tls_log[h][0])[:512]:
                    del self._tls_log[old]
            self._tls_log[host] = (now, 0)
        more = f" ({suppressed} more from {host} not logged)" if suppressed else ""
        logger.warning("connection from %s: %s%s", peer, reason, more)

    def leave(self, association: Association) -> None:
        with self._lock:
            self._pending.pop(association, None)
            self._open.discard(association)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = self.socket.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning
                continue
            if self.settings.tcp_nodelay:
                try:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            conn.settimeout(self.limits.artim_timeout)
            association = Association(conn, address, self)
            thread = threading.Thread(
                target=self._run, args=(association,), name=f"assoc-{address[0]}", daemon=True
            )
            victim = None
            with self._lock:
                if len(self._pending) >= self.limits.max_pending:
                    victim = next(iter(self._pending))
                    del self._pending[victim]
                    self._evicted += 1
                self._pending[association] = None
                self._threads.add(thread)
            if victim is not None:
                victim.evict()
                self._log_evictions()
            thread.start()

    def _log_evictions(self) -> None:
        now = time.monotonic()
        if now - self._evicted_logged_at >= limits.EVICTION_LOG_INTERVAL:
            logger.warning(
                "%d connection(s) closed so far because %d others had not associated yet "
                "(max_pending_connections; last from %s)",
                self._evicted,
                self.limits.max_pending,
                next(reversed(self._pending)).peer if self._pending else "?",
            )
            self._evicted_logged_at = now

    def _run(self, association: Association) -> None:
        try:
            association.run()
        except Exception:  # noqa: BLE001 - one association must never take the server down
            logger.exception("association from %s failed", association.peer)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, close open associations (their unfinished instances are dropped)."""
        self._stopping.set()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()
        self._thread.join(timeout)
        with self._lock:
            connections = [*self._open, *self._pending]
            threads = list(self._threads)
        for association in connections:
            try:
                association.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
