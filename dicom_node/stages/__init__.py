"""The stages of a node's data flow, each a component with ``start()`` and ``stop(deadline)``.

Receive (:class:`Receiver`: recovery, then the C-STORE SCP that joins :mod:`dicom_node.net` to
:mod:`dicom_node.ingest`), stable studies and jobs (:class:`StableStudies`, :class:`Jobs` with
:func:`lease_job` and :func:`purge_job`), process (:class:`Processing`: the workers that claim and
triage, with :func:`load_predictor`), record (:class:`OutputsRecorder`: outputs written, result
and deliveries recorded), outputs (:class:`OutputsProcess`: SR and SC in a child process),
deliver (:class:`Delivery`: the outbox over C-STORE or STOW-RS) and wake-ups (:class:`Wakeups`).
:mod:`dicom_node.node` assembles them; stages never import the node or the commands.

The names are imported on first use: the spawned outputs process imports
:mod:`~dicom_node.stages.outputs` alone, without the network and HTTP stacks of the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.stages.deliver import Delivery
    from dicom_node.stages.jobs import Jobs, StableStudies, lease_job, purge_job
    from dicom_node.stages.model import load_predictor
    from dicom_node.stages.outputs import OutputsProcess
    from dicom_node.stages.process import Processing
    from dicom_node.stages.receive import Receiver, start_scp
    from dicom_node.stages.record import OutputsRecorder
    from dicom_node.stages.wakeup import Wakeups

_HOME = {
    "Delivery": "deliver",
    "Jobs": "jobs",
    "StableStudies": "jobs",
    "lease_job": "jobs",
    "purge_job": "jobs",
    "load_predictor": "model",
    "OutputsProcess": "outputs",
    "Processing": "process",
    "Receiver": "receive",
    "start_scp": "receive",
    "OutputsRecorder": "record",
    "Wakeups": "wakeup",
}

__all__ = [
    "Delivery",
    "Jobs",
    "OutputsProcess",
    "OutputsRecorder",
    "Processing",
    "Receiver",
    "StableStudies",
    "Wakeups",
    "lease_job",
    "load_predictor",
    "purge_job",
    "start_scp",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
