"""The worklist a node opens (``triage serve`` and ``triage worker``).

The receive side is :class:`dicom_node.receiver.Receiver`; processing, delivery and the jobs live
in :mod:`dicom_node.processing`, :mod:`dicom_node.delivery` and :mod:`dicom_node.jobs`,
assembled by :mod:`dicom_node.node`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist


def open_worklist(settings: NodeSettings) -> Worklist:
    """The worklist of ``settings`` (schema created if needed)."""
    from triage_core.worklist import Worklist

    worklist = Worklist(
        settings.database_url,
        max_attempts=settings.max_attempts,
        max_delivery_attempts=settings.delivery_max_attempts,
        delivery_backoff_base=settings.delivery_backoff,
        delivery_backoff_cap=max(settings.delivery_backoff_max, settings.delivery_backoff),
        sqlite_synchronous=settings.sqlite_synchronous,
    )
    worklist.create_all()
    return worklist
