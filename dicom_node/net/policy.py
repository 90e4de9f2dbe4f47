"""Who may associate with the node.

:class:`AccessPolicy` is the calling-AE allow-list (``AE`` or ``AE@HOST`` entries from the
``allow_ae`` setting); an empty list admits every calling AE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.settings import AllowedPeer


@dataclass(frozen=True)
class AccessPolicy:
    """Which calling AEs (and hosts) may associate; an empty list admits everyone."""

    allowed: tuple[AllowedPeer, ...] = ()

    def admits(self, ae_title: str, host: str) -> bool:
        return not self.allowed or any(p.matches(ae_title, host) for p in self.allowed)
