"""Cost measurements of a model (parameters, FLOPs, CPU time) and table cells, for
``triage compare`` and the model card."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def count_flops(model: torch.nn.Module, input_size: int) -> int:
    """Forward FLOPs for one image (``torch.utils.flop_counter``; one multiply-add = 2 FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, input_size, input_size))
    return int(counter.get_total_flops())


def cpu_ms_per_image(
    model: torch.nn.Module, input_size: int, batch_size: int, repeats: int = 10, warmup: int = 2
) -> float:
    """CPU milliseconds per image of an fp32 eager forward pass at ``batch_size``: the fastest
    of ``repeats`` runs (on a shared machine the minimum is the least disturbed estimate)."""
    import torch

    model.eval()
    x = torch.randn(batch_size, 3, input_size, input_size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * min(times) / batch_size


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``n/a`` for a missing value, floats with ``digits`` decimals."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
