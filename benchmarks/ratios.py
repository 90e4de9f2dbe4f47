"""The one line every benchmark prints per ratio, so that `make bench` can gather them and a
test can check that each benchmark still measures what it claims (issue 25, item 5).

A ratio line reads::

    RATIO ingest small 1 assoc, triage / Orthanc: 1.12x  [target >= 1.5: missed]

``value`` is ours divided by the baseline measured in the same run, oriented so that more is
better unless the line says otherwise (``lower=True`` targets, e.g. memory or start-up time as a
multiple of the baseline). A baseline that could not be measured (Orthanc not installed) prints
``n/a`` and the reason, never a made-up number.
"""

from __future__ import annotations

import math
from typing import Any

PREFIX = "RATIO"


def ratio_line(
    name: str,
    ours: float | None,
    baseline: float | None,
    *,
    target: float | None = None,
    lower: bool = False,
    why_missing: str = "baseline not measured",
) -> str:
    """``RATIO name: ours / baseline`` with the target's verdict (``lower``: the ratio must be
    at most ``target``, else at least)."""
    if ours is None or not baseline or not math.isfinite(ours) or not math.isfinite(baseline):
        return f"{PREFIX} {name}: n/a ({why_missing})"
    value = ours / baseline
    text = f"{PREFIX} {name}: {value:.2f}x"
    if target is not None:
        met = value <= target if lower else value >= target
        text += f"  [target {'<=' if lower else '>='} {target:g}: {'met' if met else 'missed'}]"
    return text


def print_ratio(name: str, ours: float | None, baseline: float | None, **options: Any) -> None:
    """Print :func:`ratio_line` (same arguments; flushed: `make bench` shows lines as they
    come)."""
    print(ratio_line(name, ours, baseline, **options), flush=True)
