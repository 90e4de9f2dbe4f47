"""``triage compare``: finished cross-validation runs side by side, on the same folds.

``triage compare --cv-runs CVDIR... --out OUT`` reads each run's ``cv.json`` and ``oof.csv``
(:func:`training.runs.load_runs` refuses runs on other folds: out-of-fold figures are only
comparable on the same patients in the same folds), and writes ``OUT/cv_report.md``: the OOF
AUROC table (patient-bootstrap intervals), each run's recipe, model size and cost, and the seed
study's published figures beside the multiclass runs' OOF accuracy and macro-F1, with the
differences spelled out.

``--ensemble [NAME=]CVDIR[:VARIANT],CVDIR...`` (repeatable) adds the ensemble of those runs (the
mean of their OOF probabilities, :mod:`training.ensemble`; the members join the fold check) as a
row beside the single models, and the rule "ship only if it beats the best single model by
>= 0.01 OOF mean AUROC", computed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from triage_core.errors import CommandError, TriageError

#: The seed study's test figures (3-class multiclass subset, weighted cross-entropy, full NIH
#: data, ImageNet initialisation): accuracy and macro-F1.
SEED_STUDY: dict[str, tuple[float, float]] = {
    "resnet18": (0.699, 0.66),
    "efficientnet_b0": (0.762, 0.74),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cv-runs",
        nargs="+",
        type=Path,
        required=True,
        metavar="CVDIR",
        help="finished `triage train --cv K` runs (any architectures and tasks) on the same "
        "folds (same images, K and fold seed)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (cv_report.md)")
    parser.add_argument(
        "--timing",
        action="store_true",
        help="also measure CPU ms per image (batch 1) of each run's fold-0 model",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (with --timing)")
    parser.add_argument(
        "--ensemble",
        action="append",
        default=[],
        metavar="[NAME=]CVDIR[:VARIANT],CVDIR[:VARIANT]...",
        help="an ensemble of finished CV runs on the same folds (repeatable): its OOF "
        "prediction is the mean of the members' OOF probabilities (variant ema where present, "
        "else final); tabulated beside the single models with the ship rule (>= 0.01 mean "
        "AUROC over the best single)",
    )


def _cost(run_dir: Path, timing: bool) -> dict[str, Any]:
    """Parameters, FLOPs per image (and CPU ms per image) of the run's fold-0 model."""
    from training.report import count_flops, cpu_ms_per_image
    from training.runs import CVRun
    from triage_core.models import checkpoint_paths, count_parameters, load_checkpoint

    name = CVRun(run_dir).fold_dir(0) / "model"
    if not all(p.is_file() for p in checkpoint_paths(name)):
        return {}
    model, spec = load_checkpoint(name)
    model.float()
    out: dict[str, Any] = {
        "params": count_parameters(model),
        "flops": count_flops(model, spec.input_size),
    }
    if timing:
        out["ms_b1"] = round(cpu_ms_per_image(model, spec.input_size, 1), 2)
    return out


def _extras(recipe: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The run's training-only additions: extra sources and the 64 px degradation."""
    out = "".join(
        f", source {Path(str(src['images'])).name} ({src['n_images']} images, weight "
        f"{src['weight']:g})"
        for src in summary.get("sources") or []
    )
    if recipe.get("degrade64"):
        out += f", {recipe['degrade64']:.0%} of the training images at 64 px and back"
    return out


def seed_study_section(runs: Sequence[Mapping[str, Any]]) -> str:
    """The multiclass runs' OOF accuracy and macro-F1 beside the seed study's test figures."""
    lines = [
        "## Beside the seed study",
        "",
        "| run | variant | our OOF accuracy | seed accuracy | our OOF macro-F1 | seed macro-F1 |",
        "|---|---|---|---|---|---|",
    ]
    multiclass = [r for r in runs if r["summary"].get("task", "multilabel") == "multiclass"]
    for r in multiclass:
        recipe = r["summary"]["recipe"]
        seed = SEED_STUDY.get(recipe["arch"])
        for name, row in r["summary"]["variants"].items():
            if name not in ("final", "ema"):
                continue
            lines.append(
                f"| {recipe['arch']} ({Path(r['dir']).name}) | {name} | "
                f"{row['accuracy'] * 100:.1f} % | "
                f"{f'{seed[0] * 100:.1f} %' if seed else 'not in the seed study'} | "
                f"{row['macro_f1']:.2f} | {f'{seed[1]:.2f}' if seed else '-'} |"
            )
    seed_text = ", ".join(
        f"{arch}: accuracy {acc:.3f}, macro-F1 {f1:.2f}" for arch, (acc, f1) in SEED_STUDY.items()
    )
    if not multiclass:
        lines = lines[:2] + ["No multiclass run given (`triage train --cv K --task multiclass`)."]
    lines += [
        "",
        f"Seed study (3-class multiclass subset of the full NIH set, test split): {seed_text}.",
        "Not like for like: the seed study trained on tens of thousands of images and scored "
        "one test split; here the shared subset, scored out-of-fold (every image once, by the "
        "fold model that did not see its patient). ResNet-18 starts from random weights unless "
        "a local ImageNet file is given (`--pretrained FILE`); EfficientNet-B0 from the Lite0 "
        "tensors. Shown for orientation.",
        "",
    ]
    return "\n".join(lines)


def ensemble_section(
    runs: Sequence[Mapping[str, Any]],
    singles: Mapping[str, Mapping[str, Any]],
    tasks: Mapping[str, str],
    ensembles: Sequence[str],
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The rows of the ``ensembles`` (``--ensemble`` texts) and the report's lines on them:
    members, and the ship rule against the best single row of ``singles`` of the same task
    (``tasks``: the task of each single row)."""
    from training.ensemble import EnsembleSpec, score_ensemble, ship_decision

    by_dir = {str(Path(r["dir"]).resolve()): r for r in runs}
    rows: dict[str, dict[str, Any]] = {}
    lines = ["## Ensembles", ""]
    for text in ensembles:
        spec = EnsembleSpec.parse(text)
        members = [(by_dir[str(path.resolve())], variant) for path, variant in spec.members]
        row = score_ensemble(members)
        rows[f"ensemble {spec.name}"] = row
        task = members[0][0]["summary"].get("task", "multilabel")
        decision = ship_decision({k: v for k, v in singles.items() if tasks[k] == task}, row)
        row["ship_decision"] = decision
        names = ", ".join(
            f"{m['arch']} ({Path(m['dir']).name}) {m['variant']}" for m in row["members"]
        )
        lines += [
            f"- ensemble {spec.name}: mean of the OOF probabilities of {names}.",
            f"  OOF mean AUROC {decision['ensemble_mean']:.3f} against the best single model "
            f"({decision['best_single']}) {decision['best_single_mean']:.3f}: gain "
            f"{decision['gain']:+.3f}; rule: ship only if the gain is >= "
            f"{decision['margin']:.2f} -> {'SHIP' if decision['ship'] else 'do not ship'}.",
        ]
    return rows, [*lines, ""]


def cv_report(dirs: Sequence[Path], timing: bool = False, ensembles: Sequence[str] = ()) -> str:
    """Out-of-fold rows of finished CV runs on the same folds (``final`` and, where present,
    ``ema`` and ``epoch0``) with their architecture, recipe and cost, beside the seed study;
    with ``ensembles`` (``--ensemble`` texts) also their rows and the ship rule.

    Raises
    ------
    TrainingError
        A run that is not finished, runs (ensemble members included) on different folds, or a
        bad ensemble.
    """
    from training.ensemble import EnsembleSpec
    from training.oof import format_table
    from training.runs import load_runs

    all_dirs = [Path(d) for d in dirs]
    for text in ensembles:  # members that are not among the runs are loaded (and checked) too
        for path, _ in EnsembleSpec.parse(text).members:
            if path.resolve() not in {d.resolve() for d in all_dirs}:
                all_dirs.append(path)
    runs = load_runs(all_dirs)
    variants: dict[str, dict[str, Any]] = {}
    tasks: dict[str, str] = {}
    notes = []
    class_names: Sequence[str] = runs[0]["summary"].get("class_names") or ()
    for r in runs:
        summary, recipe = r["summary"], r["summary"]["recipe"]
        label = f"{recipe['arch']} ({Path(r['dir']).name})"
        for name in ("final", "ema", "epoch0"):
            if name in summary["variants"]:
                variants[f"{label} {name}"] = summary["variants"][name]
                tasks[f"{label} {name}"] = summary.get("task", "multilabel")
        cost = _cost(Path(r["dir"]), timing)
        size = (
            f"; {cost['params'] / 1e6:.2f} M parameters, {cost['flops'] / 1e9:.2f} GFLOPs"
            + (f", {cost['ms_b1']} CPU ms/image" if "ms_b1" in cost else "")
            if cost
            else ""
        )
        notes.append(
            f"- {label}: {summary.get('task', 'multilabel')}, {recipe['image_size']} px, "
            f"{recipe['epochs']} epochs, lr {recipe['lr']:g}, head "
            f"{recipe.get('head_init', 'random')}, initial weights {recipe['pretrained']}"
            f"{', init from ' + recipe['init_from'] if recipe.get('init_from') else ''}"
            f"{_extras(recipe, summary)}; "
            f"{summary['data']['images']} images, {summary['folds']} folds "
            f"(seed {summary['fold_seed']}){size}"
        )
    table_args: dict[str, Any] = {"class_names": class_names} if class_names else {}
    ensemble_rows, ensemble_lines = (
        ensemble_section(runs, variants, tasks, ensembles) if ensembles else ({}, [])
    )
    return "\n".join(
        [
            format_table(
                {**variants, **ensemble_rows},
                title="(patient-wise CV, pooled out-of-fold predictions)",
                **table_args,
            ),
            "",
            *notes,
            "",
            *ensemble_lines,
            seed_study_section(runs),
        ]
    )


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        text = cv_report(args.cv_runs, timing=args.timing, ensembles=args.ensemble)
    except TriageError as exc:
        raise CommandError(str(exc), 2) from exc
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CommandError(f"not a readable CV run: {exc}", 2) from exc
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cv_report.md").write_text(text)
    print(text)
    return 0
