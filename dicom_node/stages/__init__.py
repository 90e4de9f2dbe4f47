"""The stages of a node's data flow, each a component with ``start()`` and ``stop(deadline)``.

Receive (:class:`Receiver`: recovery, then the C-STORE SCP that joins :mod:`dicom_node.net` to
:mod:`dicom_node.ingest`), stable studies and jobs (:class:`StableStudies`, :class:`Jobs` with
:func:`lease_job` and :func:`purge_job`), process (:class:`Processing`: claim, triage, record,
with :func:`load_predictor`), outputs (:class:`OutputsProcess`: SR and SC in a child process),
deliver (:class:`Delivery`: the outbox over C-STORE or STOW-RS) and wake-ups (:class:`Wakeups`).
:mod:`dicom_node.node` assembles them; stages never import the node or the commands.
"""

from dicom_node.stages.deliver import Delivery
from dicom_node.stages.jobs import Jobs, StableStudies, lease_job, purge_job
from dicom_node.stages.model import load_predictor
from dicom_node.stages.outputs import OutputsProcess
from dicom_node.stages.process import Processing
from dicom_node.stages.receive import Receiver, start_scp
from dicom_node.stages.wakeup import Wakeups

__all__ = [
    "Delivery",
    "Jobs",
    "OutputsProcess",
    "Processing",
    "Receiver",
    "StableStudies",
    "Wakeups",
    "lease_job",
    "load_predictor",
    "purge_job",
    "start_scp",
]
