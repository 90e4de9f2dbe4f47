"""Write the ONNX serving graph of a checkpoint.

``python -m training.export --onnx --model NAME --check-images DIR [DIR...]`` writes the serving
graph ``NAME.onnx`` beside an existing checkpoint (:mod:`training.onnx_export`: ONNX Runtime
checked against torch on those images; nothing is written when the check fails).
``triage train --final-from`` already writes it for the model it ships, with the fp16 weights
and their check; this command is for a checkpoint made elsewhere or a graph to rewrite.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from triage_core.errors import TriageError

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint NAME")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="write NAME.onnx beside the checkpoint --model (checked on --check-images)",
    )
    parser.add_argument(
        "--check-images",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="image files or folders for the ONNX Runtime vs torch check",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.onnx:
        parser.error(
            "only --onnx is exported here; fp16 weights with their check come from "
            "`triage train --final-from CVDIR`"
        )
    if not args.check_images:
        parser.error("--onnx needs --check-images PATH... (real images for the self-check)")
    from training.onnx_export import check_inputs, export_onnx
    from triage_core.models import read_spec

    try:
        inputs = check_inputs(args.check_images, read_spec(args.model))
        check = export_onnx(args.model, inputs)
    except TriageError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(check, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
