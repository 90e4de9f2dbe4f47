"""Data-parallel training under ``torchrun``: the process group, this process's rank, and the
device it trains on.

``torchrun --nproc-per-node N -m dicom_node train --cv K ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`setup` joins the group (gloo on CPU, nccl on CUDA). Without ``torchrun``
everything here is a no-op and :class:`Dist` says rank 0 of 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from training.recipe import TrainingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def current() -> Dist:
    """The group this process belongs to (rank 0 of 1 when there is none)."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return Dist()
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` -> this rank's GPU."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda requested but CUDA is not available")
        if requested == "cuda":
            requested = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(requested))
    return requested


def setup(device: str) -> Dist:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as tdist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    info = current()
    logger.info("distributed: rank %d of %d (%s)", info.rank, info.world, backend)
    return info


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if current().enabled:
        import torch.distributed as tdist

        tdist.barrier()


def teardown() -> None:
    """Leave the process group (after a last barrier)."""
    if current().enabled:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()


__all__ = ["Dist", "barrier", "current", "resolve_device", "setup", "teardown"]
