"""Who may associate with the node: our called AE title and the calling-AE allow-list.

:class:`AccessPolicy` answers each A-ASSOCIATE-RQ with ``None`` (admit) or the
A-ASSOCIATE-RJ codes of PS3.8 Table 9-21. It reads only the two AE title fields and the
peer's address, so it runs before the request is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicom_node.net.pdu import CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED, Rejection

if TYPE_CHECKING:
    from dicom_node.settings import AllowedPeer, NodeSettings


@dataclass(frozen=True)
class AccessPolicy:
    """The calling AEs (and hosts) that may associate, and the called AE title we answer to.

    ``allowed`` empty admits every calling AE; ``called_ae`` ``None`` admits any called AE
    title (the ``accept_any_called_ae`` setting; off by default).
    """

    allowed: tuple[AllowedPeer, ...] = ()
    called_ae: str | None = None

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> AccessPolicy:
        called = None if settings.accept_any_called_ae else settings.ae_title
        return cls(tuple(settings.allow_ae), called)

    def admits(self, ae_title: str, host: str) -> bool:
        """Whether the calling AE ``ae_title`` connecting from ``host`` is allowed."""
        return not self.allowed or any(p.matches(ae_title, host) for p in self.allowed)

    def check(self, calling: str, called: str, host: str) -> Rejection | None:
        """``None`` to admit, else the rejection (called AE first, then calling AE)."""
        if self.called_ae is not None and called.strip() != self.called_ae:
            return CALLED_AE_NOT_RECOGNIZED
        if not self.admits(calling, host):
            return CALLING_AE_NOT_RECOGNIZED
        return None
