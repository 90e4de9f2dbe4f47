"""Who we are in associations and in the files we write: the Implementation Class UID (a
UUID-derived UID, PS3.5 B.2) and version name (<= 16 characters) of PS3.7 D.3.3.2 and PS3.10
7.1. A module of its own so the network layer and the ingest layer share it without importing
each other."""

from __future__ import annotations

from triage_core import __version__

IMPLEMENTATION_CLASS_UID = "2.25.2057702733104324283583332710527436324"
IMPLEMENTATION_VERSION_NAME = f"CXRTRIAGE_{__version__}"[:16]
