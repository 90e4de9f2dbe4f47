"""Who this node is on the wire (PS3.7 D.3.3.2): implementation class UID and version name,
sent in the A-ASSOCIATE-AC and written into the file meta of every stored instance."""

from __future__ import annotations

from triage_core import __version__

#: Our Implementation Class UID (a UUID-derived UID, PS3.5 B.2) and version name (<= 16 chars).
IMPLEMENTATION_CLASS_UID = "2.25.2057702733104324283583332710527436324"
IMPLEMENTATION_VERSION_NAME = f"CXRTRIAGE_{__version__}"[:16]
