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

The inputs go through :func:`triage_core.pipeline.triage_studies`, the chain the node's workers
run (eligibility, preprocessing, prediction, OOD score, aggregation, priority, CAM), with the
``auto`` input kind (a PNG/JPEG by suffix or content, anything else DICOM): this command only
expands paths and formats the results.

Exit status: 0 when at least one input could be read, 1 when none could, 2 on a usage or model
problem (no ``--model`` and no default model shipped, or an invalid checkpoint); errors are
raised as :class:`~triage_core.errors.CommandError`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from triage_core.errors import CommandError

if TYPE_CHECKING:
    import numpy as np

    from triage_core.inference import Predictor
    from triage_core.pipeline import StudyOutput

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    """``type=`` of the count options: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    parser.add_argument(
        "--threads", type=_positive_int, help="CPU threads (default: the runtime's)"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=16, help="images per forward pass"
    )
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


def _open_predictor(args: argparse.Namespace) -> Predictor:
    """The model of ``--model`` (or the shipped one) in the chosen runtime."""
    from triage_core.errors import CheckpointError
    from triage_core.inference import Predictor

    try:
        if args.model is None:
            from triage_core.models import default_checkpoint_path

            checkpoint = default_checkpoint_path()
            logger.info("using the default model %s", checkpoint)
        else:
            checkpoint = Path(args.model)
        return Predictor(
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
        raise CommandError(f"{exc}{hint}", 2) from exc
    except ValueError as exc:
        raise CommandError(str(exc), 2) from exc


def _record(
    path: Path, output: StudyOutput, model: dict[str, str], cam_dir: Path | None, taken: set[str]
) -> dict[str, Any]:
    """The JSON object of one input (a one-image study), writing its overlay PNG."""
    result = output.result
    (image,) = result.images
    record: dict[str, Any] = {"path": str(path), "eligible": image.eligible, "reason": image.reason}
    if image.error:  # the pipeline keeps paths out of its errors; here the operator named it
        record["error"] = f"{path}: {image.error}"
    record.update(probabilities={}, findings=[], priority_score=None, priority_level=None)
    record["model"] = model
    if not result.findings:
        return record
    # out-of-distribution score (None: the model has no reference); above the threshold the
    # image is unlike the training images and its probabilities are not to be trusted
    record["ood_score"] = None if image.ood_score is None else round(image.ood_score, 3)
    record["low_confidence"] = image.low_confidence
    record["probabilities"] = {n: round(p, 4) for n, p in image.probabilities.items()}
    record["findings"] = [f.name for f in result.findings if f.present]
    record["priority_score"] = result.priority_score
    record["priority_level"] = result.priority_level
    if cam_dir is None:
        return record
    top = result.top_finding
    assert top is not None  # there are findings
    if output.cam_overlay is None:
        record["cam_error"] = output.cam_error or "no overlay"
        return record
    target = _cam_name(cam_dir, path, top.name, taken)
    try:
        _write_png(output.cam_overlay, target)
    except OSError as exc:
        record["cam_error"] = str(exc)
        logger.error("%s: no Grad-CAM overlay: %s", path, exc)
    else:
        record["cam"] = str(target)
    return record


def _triage(
    paths: Sequence[Path], predictor: Predictor, cam_dir: Path | None, taken: set[str]
) -> list[dict[str, Any]]:
    """One chunk of inputs, each a one-image study, in one forward pass."""
    from triage_core.pipeline import triage_studies

    spec = predictor.spec
    model = {"name": spec.name or spec.arch, "version": spec.version}
    studies = [(str(path), [(str(path), path)]) for path in paths]
    outputs = triage_studies(studies, predictor, with_cam=cam_dir is not None, kind="auto")
    return [
        _record(path, output, model, cam_dir, taken)
        for path, output in zip(paths, outputs, strict=True)
    ]


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
    """Run ``triage predict``; returns the exit status (errors raise ``CommandError``)."""
    predictor = _open_predictor(args)
    cam_dir = Path(args.cam_dir) if args.cam_dir else None
    if cam_dir is not None:
        try:
            cam_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"cannot create --cam-dir {cam_dir}: {exc}", 2) from exc

    paths = _expand(args.paths)
    records: list[dict[str, Any]] = []
    taken: set[str] = set()
    # a chunk at a time: full-resolution images are large, and JSON lines stream out
    for start in range(0, len(paths), args.batch_size):
        chunk = _triage(paths[start : start + args.batch_size], predictor, cam_dir, taken)
        records.extend(chunk)
        if args.format == "json":
            for record in chunk:
                sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
    if args.format == "table":
        _print_table(records, sys.stdout)
        sys.stdout.flush()
    if not any("error" not in r for r in records):
        raise CommandError("no input could be read", 1)
    return 0
