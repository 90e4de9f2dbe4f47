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


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _auroc_cell(row: Mapping[str, Any]) -> str:
    auc = row.get("auroc")
    low, high = row.get("auroc_ci95", (None, None))
    if auc is None:
        return "n/a"
    if low is None:
        return f"{auc:.3f}"
    return f"{auc:.3f} [{low:.2f}, {high:.2f}]"


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
            f"| {e['arch']} | {_fmt(m['accuracy'])} | {_fmt(m['macro_f1'])} | "
            f"{best} ({_fmt(m['per_class'][best]['recall'])}) | {_fmt(m.get('mean_auroc'))} |"
        )
    lines += ["", "## Per-class AUROC on test [95% bootstrap CI]", ""]
    lines.append("| model | " + " | ".join(class_names) + " |")
    lines.append("|---|" + "---|" * len(class_names))
    for e in entries:
        cells = [_auroc_cell(e["metrics"]["per_class"][c]) for c in class_names]
        lines.append(f"| {e['arch']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per-class precision / recall / F1 on test", ""]
    lines.append("| model | class | precision | recall | F1 | positives |")
    lines.append("|---|---|---|---|---|---|")
    for e in entries:
        for c in class_names:
            r = e["metrics"]["per_class"][c]
            lines.append(
                f"| {e['arch']} | {c} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | "
                f"{_fmt(r['f1'])} | {r['support']} |"
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
            f"{_fmt(m.get('ece_before'))} → {_fmt(m.get('ece_after'))} |"
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


def _chance_sentence(test: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """Which AUROC intervals include chance (0.5), computed, not assumed."""
    with_chance = []
    for name in class_names:
        low, high = test["per_class"][name].get("auroc_ci95", (None, None))
        if low is not None and low <= 0.5 <= high:
            with_chance.append(name)
    if len(with_chance) == len(class_names):
        return "Every AUROC interval includes 0.5 (chance)."
    if with_chance:
        return f"The AUROC intervals of {', '.join(with_chance)} include 0.5 (chance)."
    return "No AUROC interval includes 0.5."


def render_model_card(
    spec: Any,
    test: Mapping[str, Any],
    *,
    commands: Sequence[str],
    method: str = "",
    notes: Sequence[str] = (),
    candidates: Sequence[Mapping[str, Any]] = (),
    weights_bytes: int = 0,
) -> str:
    """``MODEL_CARD.md`` for a shipped checkpoint: data and counts, the exact commands, test
    metrics with intervals, and plainly stated limitations.

    ``candidates`` are the other runs considered (name, validation and test mean AUROC), so the
    choice among them is visible; the choice itself is made on validation only. ``method``
    is a paragraph describing any stage before the findings training; ``notes`` are extra
    limitation bullets.
    """
    training = spec.training
    data = training["data"]
    counts = data["counts"]
    fp16 = training.get("fp16_check", {})
    near_chance = (test.get("mean_auroc") or 0.5) < 0.6
    lines = [
        f"# Model card: {spec.name} v{spec.version}",
        "",
        "**Not for clinical use.** This is a demonstration model of the cxr-triage pipeline. "
        + (
            "Its test AUROCs are close to chance (0.5): it does not detect Atelectasis, "
            "Effusion or Infiltration reliably, and its priority scores carry no clinical "
            "meaning."
            if near_chance
            else "Its test metrics are below; it has not been validated clinically."
        ),
        "",
        "## What it is",
        "",
        f"- Architecture: {spec.arch} (timm, random initialisation: no ImageNet initialisation "
        "was available on the machine that trained it), 3 sigmoid outputs "
        f"({', '.join(spec.class_names)}), task `{spec.task}`.",
        f"- Input: {spec.input_size} x {spec.input_size} px, letterboxed gray image repeated to "
        f"3 channels, ImageNet mean/std (preprocessing version {spec.preprocessing_version}).",
        f"- Weights: {training.get('weights_dtype', 'float32')} safetensors"
        + (f", {weights_bytes / 2**20:.1f} MB" if weights_bytes else "")
        + "; loaded as fp32. fp16 check on the test split: largest probability change "
        f"{fp16.get('max_abs_probability_difference', float('nan')):.2g}, largest AUROC change "
        f"{fp16.get('max_auroc_difference', float('nan')):.2g}.",
        f"- Calibration: temperature {spec.temperature:.3f} fitted on validation (NLL). "
        "Operating thresholds "
        + ", ".join(f"{n} {t:.3f}" for n, t in zip(spec.class_names, spec.thresholds, strict=True))
        + f" ({spec.metrics.get('thresholds', {}).get('rule', '')}).",
        f"- Code: cxr-triage {spec.code_version}, torch {training.get('torch')}.",
        "",
        "## Data",
        "",
        "NIH ChestX-ray14 (Wang et al., CVPR 2017; data provided by the NIH Clinical Center, "
        "https://nihcc.app.box.com/v/ChestXray-NIHCC): the 584 images at 256 px in "
        f"`{data['images']}`, labels `{data['labels']}` (NIH `Data_Entry_2017` rows). "
        "Patient-wise split 60/20/20, seed "
        f"{data['split']['seed']} (no patient in two splits; split fingerprint "
        f"`{data['split']['fingerprint']}`). Positives per class (an image can carry several; "
        "`none` = none of the three, including No Finding):",
        "",
        "| split | images | patients | " + " | ".join(spec.class_names) + " | none |",
        "|---|---|---|" + "---|" * (len(spec.class_names) + 1),
    ]
    for part in ("train", "val", "test"):
        row = counts[part]
        lines.append(
            f"| {part} | {row['images']} | {row['patients']} | "
            + " | ".join(str(row[c]) for c in spec.class_names)
            + f" | {row.get('none', '')} |"
        )
    lines += [
        "",
        "## How it was trained (exact commands, from the repository root)",
        "",
        "```",
        *commands,
        "```",
        "",
        method,
        "",
        f"Findings training: best validation epoch {training['best_epoch']} of "
        f"{training['epochs_run']} (early stopping on validation mean AUROC, patience as in the "
        f"command), AdamW, {training['schedule']} schedule, batch {training['batch_size']}, "
        "class-balanced BCE (`pos_weight`), small affine + brightness/contrast augmentation, no "
        "flips. CPU only (2 shared cores).",
        "",
    ]
    if candidates:
        lines += [
            "Runs considered (all EfficientNet-B0, same split and seed). The shipped run was "
            "chosen by **validation** mean AUROC only; test numbers are shown for transparency. "
            "With 11 to 16 validation positives per class, differences of a few hundredths are "
            "within noise, so the choice among these runs is close to arbitrary:",
            "",
            "| run | validation mean AUROC | test mean AUROC |",
            "|---|---|---|",
        ]
        for c in candidates:
            lines.append(f"| {c['name']} | {_fmt(c.get('val'))} | {_fmt(c.get('test'))} |")
        lines.append("")
    lines += [
        f"## Test metrics (n = {test['images']}, never used for training or selection)",
        "",
        "| finding | AUROC [95% bootstrap CI] | precision | recall | F1 | positives |",
        "|---|---|---|---|---|---|",
    ]
    for name in spec.class_names:
        row = test["per_class"][name]
        lines.append(
            f"| {name} | {_auroc_cell(row)} | {_fmt(row['precision'])} | {_fmt(row['recall'])} "
            f"| {_fmt(row['f1'])} | {row['support']} |"
        )
    lines += [
        "",
        f"Mean AUROC {_fmt(test.get('mean_auroc'))}; at the operating thresholds: macro-F1 "
        f"{_fmt(test.get('macro_f1'))}, mean per-class accuracy {_fmt(test.get('accuracy'))}. "
        f"Expected calibration error (10 bins, all image-class pairs): "
        f"{_fmt(test.get('ece_before'))} before, {_fmt(test.get('ece_after'))} after "
        "temperature scaling. " + _chance_sentence(test, spec.class_names),
        "",
        "## Limitations (read before use)",
        "",
        "- **Not for clinical use.** "
        + ("Performance is at chance level; " if near_chance else "")
        + "the model must not influence any reading order or diagnosis.",
        f"- **Tiny training set:** {data['task_images']} images ({counts['train']['images']} "
        "for training), far below the tens of "
        "thousands such models need; wide confidence intervals (13 to 26 test positives per "
        "class).",
        "- **No ImageNet initialisation:** no pretrained weights could be downloaded on the "
        "training machine. Published models trained on the full NIH set (about 112,000 images) "
        "report AUROCs from about 0.6-0.73 (Infiltration) to 0.78-0.86 (Effusion) (Wang et al. "
        "2017; Rajpurkar et al. 2017).",
        "- **Noisy labels:** NIH labels were text-mined from radiology reports (NIH estimates "
        ">90 % accuracy); Atelectasis and Infiltration labels are known to be especially "
        "unreliable.",
        "- **Shortcut risk:** a network can score findings from how a film was taken (AP, "
        "mostly portable and bedside, is more common in sicker patients) or from burned-in "
        "markers rather than from disease"
        + (" (the pretext stage above teaches exactly that)." if "pretext" in method else "."),
        "- **Biased sample:** most images come from a sample 'enriched for positive pathology', "
        "first studies of each patient only; prevalence differs from clinical practice.",
        "- Temperature scaling fixes over- or under-confidence only, not the base rate; "
        "probabilities of a near-chance model stay poorly calibrated.",
        *(f"- {note}" for note in notes),
        "",
        "## Licence and citation",
        "",
        "Images and labels: NIH ChestX-ray14, released by the NIH Clinical Center for "
        "unrestricted use (cite Wang et al., CVPR 2017, and acknowledge the NIH Clinical "
        "Center). Weights: produced by cxr-triage, same licence as the code (Apache-2.0).",
        "",
    ]
    return "\n".join(lines)
