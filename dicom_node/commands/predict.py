"""``triage predict PATH...``: findings and priority for DICOM or PNG/JPEG files.

Each input is triaged on its own (as a one-image study). Folders are expanded to the files they
contain, recursively, in sorted order.

Output (``--format json``, the default) is **JSON Lines**: one JSON object per input, on its own
line, in input order::

    {"path": "chest.dcm", "eligible": true, "reason": "",
     "probabilities": {"Atelectasis": 0.61, "Effusion": 0.12, "Infiltration": 0.55},
     "findings": ["Atelectasis", "Infiltration"], "priority_score": 61.4,
     "priority_level": "urgent", "model": {"name": "...", "version": "..."}}

``findings`` lists the classes present at the checkpoint's operating thresholds. A non-eligible
input has ``eligible: false``, its ``reason``, empty ``probabilities``/``findings`` and
``null`` priority; an unreadable one also has an ``error`` field. With ``--cam-dir DIR`` every
eligible input gets a Grad-CAM overlay PNG of its top finding (``DIR/<name>_cam_<Finding>.png``,
at the source resolution), named in the object's ``cam`` field. ``--format table`` prints the
same in aligned columns.

Exit status: 0 when at least one input could be read, 1 when none could, 2 on a usage or model
problem (no ``--model`` and no default model shipped, or an invalid checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import numpy as np

    from triage_core.inference import Predictor

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``triage predict``."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help="DICOM, PNG or JPEG files/dirs")
    parser.add_argument(
        "--model",
        metavar="CKPT",
        help="checkpoint NAME (NAME.safetensors + NAME.json); default: the shipped model",
    )
    parser.add_argument("--cam-dir", metavar="DIR", help="write a Grad-CAM overlay PNG per input")
    parser.add_argument(
        "--format",
        choices=("json", "table"),
        default="json",
        help="json: one JSON object per line (JSON Lines); table: aligned columns",
    )
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "torch"),
        default="onnxruntime",
        help="inference runtime (default onnxruntime: NAME.onnx beside the checkpoint)",
    )
    parser.add_argument(
        "--mode",
        default="auto",
        help="torch inference path: auto, eager, channels_last, bf16, compile, compile_bf16",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: the runtime's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def _expand(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            out.append(path)
    return out


def _cam_name(cam_dir: Path, path: Path, finding: str, taken: set[str]) -> Path:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.stem) or "image"
    name = f"{stem}_cam_{finding}.png"
    n = 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}_cam_{finding}.png"
    taken.add(name)
    return cam_dir / name


def _load(path: Path) -> tuple[dict[str, Any], np.ndarray | None]:
    """Read one input: its record so far and, when eligible, its image."""
    from triage_core.errors import ImageReadError, NotDicomError
    from triage_core.imaging import (
        RASTER_SUFFIXES,
        check_eligibility,
        load_image,
        read_dataset,
    )

    record: dict[str, Any] = {"path": str(path), "eligible": False, "reason": ""}
    try:
        if path.suffix.lower() in RASTER_SUFFIXES:
            return {**record, "eligible": True}, load_image(path)
        try:
            ds = read_dataset(path)
        except NotDicomError:
            # maybe a PNG/JPEG without the usual suffix; load_image sniffs the content
            image = load_image(path)
            return {**record, "eligible": True}, image
        ok, reason = check_eligibility(ds)
        if not ok:
            return {**record, "reason": reason}, None
        return {**record, "eligible": True}, load_image(ds)
    except ImageReadError as exc:
        return {**record, "reason": "unreadable", "error": str(exc)}, None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        # a malformed value that slipped past imaging's checks: report it, go on with the rest
        logger.warning("%s: malformed input: %s", path, exc)
        return {**record, "reason": "malformed", "error": f"{path}: {exc}"}, None


def _predict(
    records: list[dict[str, Any]],
    images: list[np.ndarray | None],
    predictor: Predictor,
    cam_dir: Path | None,
    taken: set[str],
) -> None:
    """Fill probabilities, findings, priority (and CAM files) into ``records`` in place."""
    from triage_core.errors import TriageError
    from triage_core.inference import aggregate_study
    from triage_core.priority import score_study
    from triage_core.spec import ImageResult

    spec = predictor.spec
    model = {"name": spec.name or spec.arch, "version": spec.version}
    todo = [i for i, image in enumerate(images) if image is not None]
    probs, scores = _probabilities_and_ood([im for im in images if im is not None], predictor)
    rows = dict(zip(todo, probs, strict=True))
    ood = dict(zip(todo, scores, strict=True)) if scores is not None else {}
    limit = spec.ood.get("threshold") if spec.ood else None
    for i, record in enumerate(records):
        record.setdefault("probabilities", {})
        record.setdefault("findings", [])
        record.setdefault("priority_score", None)
        record.setdefault("priority_level", None)
        record["model"] = model
        if i not in rows:
            continue
        # out-of-distribution score (None: the model has no reference); above the threshold
        # the image is unlike the training images and its probabilities are not to be trusted
        record["ood_score"] = round(float(ood[i]), 3) if i in ood else None
        record["low_confidence"] = bool(i in ood and limit is not None and ood[i] > limit)
        probabilities = {n: float(p) for n, p in zip(spec.class_names, rows[i], strict=True)}
        findings = aggregate_study(
            [ImageResult(uid=record["path"], eligible=True, probabilities=probabilities)], spec
        )
        score, level = score_study(findings, spec)
        record["probabilities"] = {n: round(p, 4) for n, p in probabilities.items()}
        record["findings"] = [f.name for f in findings if f.present]
        record["priority_score"] = score
        record["priority_level"] = level
        if cam_dir is not None:
            image = images[i]
            assert image is not None
            top = max(findings, key=lambda f: f.probability)
            target = _cam_name(cam_dir, Path(record["path"]), top.name, taken)
            try:
                cam = predictor.explainer().explain(image, spec.class_names.index(top.name))
                _write_png(cam.overlay, target)
            except (TriageError, OSError) as exc:
                record["cam_error"] = str(exc)
                logger.error("%s: no Grad-CAM overlay: %s", record["path"], exc)
            else:
                record["cam"] = str(target)


def _probabilities_and_ood(
    images: list[np.ndarray], predictor: Predictor
) -> tuple[np.ndarray, np.ndarray | None]:
    """Calibrated probabilities and OOD scores (``None`` without a reference), one pass."""
    import numpy as np

    from triage_core import ood
    from triage_core.imaging import to_array

    if not images:
        return np.zeros((0, predictor.spec.num_classes), dtype=np.float32), None
    batch = np.stack([to_array(image, predictor.spec) for image in images])
    probs, features = predictor.predict_with_features(batch)
    if not predictor.spec.ood:
        return probs, None
    if features is not None:
        return probs, ood.scores_from_features(predictor.spec, features)
    return probs, predictor.ood_scores(batch)


def _write_png(overlay: np.ndarray, target: Path) -> None:
    from PIL import Image

    tmp = target.with_name(target.name + ".tmp")
    Image.fromarray(overlay, mode="RGB").save(tmp, format="PNG")
    tmp.replace(target)


def _print_table(records: list[dict[str, Any]], out: TextIO) -> None:
    header = ("PATH", "STATUS", "PRIORITY", "FINDINGS (probability)")
    rows = []
    for r in records:
        if "error" in r:
            status, priority, detail = "error", "-", r["error"]
        elif not r["eligible"]:
            status, priority, detail = "not eligible", "-", r["reason"]
        else:
            status = "LOW CONFIDENCE" if r.get("low_confidence") else "ok"
            priority = f"{r['priority_score']:.1f} {r['priority_level']}"
            detail = ", ".join(
                f"{name}{'*' if name in r['findings'] else ''} {p:.3f}"
                for name, p in r["probabilities"].items()
            )
        rows.append((r["path"], status, priority, detail))
    widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(3)]
    for row in [header, *rows]:
        out.write("  ".join(str(v).ljust(w) for v, w in zip(row[:3], widths, strict=True)))
        out.write(f"  {row[3]}\n")
    if records:
        model = records[0]["model"]
        out.write(f"model: {model['name']} v{model['version']}; * = present at threshold\n")
        if any(r.get("low_confidence") for r in records):
            out.write(
                "LOW CONFIDENCE: the image is unlike the model's training images "
                "(out-of-distribution score above the threshold); do not trust its scores\n"
            )


def run(args: argparse.Namespace) -> int:
    """Run ``triage predict``; returns the exit status."""
    from triage_core.errors import CheckpointError
    from triage_core.inference import Predictor

    cam_dir = Path(args.cam_dir) if args.cam_dir else None
    try:
        if args.model is None:
            from triage_core.models import default_checkpoint_path

            checkpoint = default_checkpoint_path()
            logger.info("using the default model %s", checkpoint)
        else:
            checkpoint = Path(args.model)
        predictor = Predictor(
            checkpoint,
            device=args.device,
            threads=args.threads,
            batch_size=args.batch_size,
            mode=args.mode,
            runtime=args.runtime,
        )
    except CheckpointError as exc:
        no_default = args.model is None and "no default model" in str(exc)
        hint = " (--model CKPT is required until a default model ships)" if no_default else ""
        print(f"triage predict: {exc}{hint}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"triage predict: {exc}", file=sys.stderr)
        return 2
    if cam_dir is not None:
        try:
            cam_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"triage predict: cannot create --cam-dir {cam_dir}: {exc}", file=sys.stderr)
            return 2

    paths = _expand(args.paths)
    records: list[dict[str, Any]] = []
    taken: set[str] = set()
    # a chunk at a time: full-resolution images are large, and JSON lines stream out
    for start in range(0, len(paths), args.batch_size):
        loaded = [_load(path) for path in paths[start : start + args.batch_size]]
        chunk = [record for record, _ in loaded]
        _predict(chunk, [image for _, image in loaded], predictor, cam_dir, taken)
        records.extend(chunk)
        if args.format == "json":
            for record in chunk:
                sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
    if args.format == "table":
        _print_table(records, sys.stdout)
        sys.stdout.flush()
    readable = sum(1 for r in records if "error" not in r)
    if readable == 0:
        print("triage predict: no input could be read", file=sys.stderr)
        return 1
    return 0
