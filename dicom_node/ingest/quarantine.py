"""Refused data: moved aside with the reason, never deleted silently, never in the spool.

A refused data set (malformed, truncated, hostile UIDs, request and data set disagreeing) goes
to ``STORAGE/quarantine/<time>-<random>.dcm`` with a ``.txt`` beside it saying who sent it and
why, so it can be looked at; the names are ours (nothing from the network becomes a path).
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.ingest.durable import fsync_dir, write_durable

logger = logging.getLogger(__name__)


def quarantine(
    source: Path, folder: Path, root: Path, *, calling_ae: str, reason: str, fsync: bool = True
) -> str:
    """Move ``source`` (a closed temporary file) into ``folder`` with a reason note.

    Returns the quarantined file's name, or a sentence saying why nothing was kept (the source
    is removed then).
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"{stamp}-{uuid.uuid4().hex[:12]}"
    target = folder / f"{name}.dcm"
    try:
        os.replace(source, target)
        note = f"calling_ae: {calling_ae}\nreason: {reason}\n".encode("utf-8", "replace")
        write_durable(folder / f"{name}.txt", [note], root, fsync)
        if fsync:
            fsync_dir(folder)
    except OSError as exc:
        logger.error("could not quarantine rejected data (%s): %s", reason, exc)
        source.unlink(missing_ok=True)
        return "nothing: quarantine failed"
    return target.name
