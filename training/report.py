"""Cost measurements and the Markdown comparison report of ``triage compare``."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
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


def auroc_cell(row: Mapping[str, Any], ci_digits: int = 3) -> str:
    """``0.812 [0.701, 0.905]``: AUROC (three decimals) and its 95 % bootstrap interval."""
    auc = row.get("auroc")
    low, high = row.get("auroc_ci95", (None, None))
    if auc is None:
        return "n/a"
    if low is None or high is None:
        return f"{auc:.3f}"
    return f"{auc:.3f} [{low:.{ci_digits}f}, {high:.{ci_digits}f}]"


def render_report(
    entries: Sequence[Mapping[str, Any]],
    *,
    title: str,
    setup: Mapping[str, Any],
    split_table: str,
    class_names: Sequence[str],
) -> str:
    """The ``report.md`` text.

    Each entry has ``arch``, ``metrics`` (``metrics.json``), ``params``, ``flops``,
    ``ms_b1``, ``ms_b16``, ``eval_dir`` (relative link target), ``checkpoint`` and
    ``train_seconds``.
    """
    lines = [f"# {title}", ""]
    lines.append("## Setup")
    lines.append("")
    for key, value in setup.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "Split (patient-wise; class counts are positives per class):",
        "",
        "```",
        split_table,
        "```",
        "",
    ]
    lines += ["## Test results (like the seed study's table)", ""]
    lines.append("| model | test accuracy | macro-F1 | best-recall class (recall) | mean AUROC |")
    lines.append("|---|---|---|---|---|")
    for e in entries:
        m = e["metrics"]
        best = m["best_recall_class"]
        lines.append(
            f"| {e['arch']} | {fmt(m['accuracy'])} | {fmt(m['macro_f1'])} | "
            f"{best} ({fmt(m['per_class'][best]['recall'])}) | {fmt(m.get('mean_auroc'))} |"
        )
    lines += ["", "## Per-class AUROC on test [95% bootstrap CI]", ""]
    lines.append("| model | " + " | ".join(class_names) + " |")
    lines.append("|---|" + "---|" * len(class_names))
    for e in entries:
        cells = [auroc_cell(e["metrics"]["per_class"][c], ci_digits=2) for c in class_names]
        lines.append(f"| {e['arch']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per-class precision / recall / F1 on test", ""]
    lines.append("| model | class | precision | recall | F1 | positives |")
    lines.append("|---|---|---|---|---|---|")
    for e in entries:
        for c in class_names:
            r = e["metrics"]["per_class"][c]
            lines.append(
                f"| {e['arch']} | {c} | {fmt(r['precision'])} | {fmt(r['recall'])} | "
                f"{fmt(r['f1'])} | {r['support']} |"
            )
    lines += ["", "## Cost", ""]
    lines.append(
        "| model | parameters | GFLOPs / image | CPU ms/image, batch 1 | CPU ms/image, batch 16 "
        "| training time | ECE before → after |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for e in entries:
        m = e["metrics"]
        lines.append(
            f"| {e['arch']} | {e['params'] / 1e6:.2f} M | {e['flops'] / 1e9:.2f} | "
            f"{e['ms_b1']:.1f} | {e['ms_b16']:.1f} | {e['train_seconds'] / 60:.1f} min | "
            f"{fmt(m.get('ece_before'))} → {fmt(m.get('ece_after'))} |"
        )
    lines += ["", "## Plots", ""]
    for e in entries:
        plots = e["metrics"].get("plots", {})
        links = ", ".join(f"[{name}]({e['eval_dir']}/{file})" for name, file in plots.items())
        lines.append(
            f"- {e['arch']}: {links}; [metrics.json]({e['eval_dir']}/metrics.json), "
            f"[predictions.csv]({e['eval_dir']}/predictions.csv)"
        )
    lines += [
        "",
        "AUROC intervals are percentile bootstrap intervals over test images. Timings: fp32 "
        "eager forward pass, fastest of 10 runs (batch 1) or 5 runs (batch 16), on this "
        "machine's CPU with the thread count shown in the setup; on a shared machine they are "
        "upper bounds. FLOPs from `torch.utils.flop_counter` (2 per multiply-add).",
        "",
    ]
    return "\n".join(lines)
