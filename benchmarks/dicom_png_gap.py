"""How far the DICOM path's inputs and outputs sit from the PNG images the model learned from.

The shared NIH PNGs are 8-bit exports of windowed DICOMs; the model is trained on them through
``triage_core.imaging``. A chest DICOM should therefore give probabilities (and pixel statistics)
inside the range the PNG test images give. This script prints, for each shared chest DICOM:

* the intensity percentiles (1st / 50th / 99th) of the letterboxed model input, next to the
  mean +- sd of the same figures over the PNG test images;
* the calibrated probability per class and its z-score on the logit scale against the PNG test
  images (``|z| > 3`` means "unlike any PNG"), and the mean ``|z|`` over files and classes;
* the out-of-distribution score when the checkpoint carries OOD reference statistics.

Run from the repository root (a few seconds per file on 2 cores)::

    python benchmarks/dicom_png_gap.py                      # the shipped default checkpoint
    python benchmarks/dicom_png_gap.py --checkpoint runs/x/NAME --json /tmp/gap.json

The PNG reference is the checkpoint's own test split (rebuilt and checked against its recorded
fingerprint), else all 256 px PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXR_TRIAGE_SHARED_DATA", ROOT.parent / "shared" / "data"))
#: Chest radiographs among the shared DICOM files (Fake_MONOHR1 is the SIIM pixels declared
#: MONOCHROME1, so a correct reader shows it inverted: not a chest image as the model knows it).
CHEST_DICOMS = (
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "siim_cr_chest_rle_derived.dcm",
    "RG1_UNCR.dcm",
    "RG1_J2KR.dcm",
    "RG1_J2KI.dcm",
)
OTHER_DICOMS = ("RG2_JPLL.dcm", "CR-ModalitySequenceLUT.dcm", "Fake_MONOHR1.dcm")


def _png_reference(spec: Any, images: Path, labels: Path) -> list[Path]:
    """The checkpoint's own PNG test split (``training.evaluate.rebuild_split``, checked against
    the recorded split fingerprint), or every PNG in ``images`` when it cannot be rebuilt."""
    from training.data import DatasetError, attach_images, index_images
    from training.evaluate import rebuild_split

    try:
        test = rebuild_split(spec, images, labels, "test")
    except DatasetError as exc:
        print(f"(test split not rebuilt: {exc}; using every PNG)")
        return sorted(images.glob("*.png"))
    _, paths = attach_images(test.records, index_images(images))
    return list(paths)


def _stats(tensor_gray: np.ndarray) -> np.ndarray:
    return np.percentile(tensor_gray, (1, 50, 99))


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(q / (1 - q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint NAME (default: the shipped default)")
    parser.add_argument("--images", type=Path, default=DATA / "cxr14" / "256")
    parser.add_argument("--labels", type=Path, default=DATA / "cxr14" / "labels.csv")
    parser.add_argument("--dicom-dir", type=Path, default=DATA / "dicom")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    from triage_core.imaging import load_image, to_tensor
    from triage_core.inference import Predictor

    sys.path.insert(0, str(ROOT))
    predictor = Predictor(args.checkpoint, threads=args.threads, mode="eager")
    spec = predictor.spec
    mean = np.asarray(spec.mean, dtype=np.float32)[0]
    std = np.asarray(spec.std, dtype=np.float32)[0]

    def run(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[float | None]]:
        tensors = torch.stack([to_tensor(load_image(p), spec) for p in paths])
        gray = tensors[:, 0].numpy() * std + mean
        stats = np.stack([_stats(g) for g in gray])
        probs = predictor.predict_tensors(tensors)
        ood: list[float | None] = [None] * len(paths)
        scorer = getattr(predictor, "ood_scores", None)
        if scorer is not None and getattr(spec, "ood", None):
            ood = [float(v) for v in scorer(tensors)]
        return stats, probs, ood

    pngs = _png_reference(spec, args.images, args.labels)
    png_stats, png_probs, png_ood = run(pngs)
    png_logits = _logit(png_probs)
    mu, sd = png_logits.mean(0), png_logits.std(0) + 1e-6
    names = list(spec.class_names)
    print(f"checkpoint: {spec.display_name} ({spec.arch}, {spec.input_size} px)")
    print(f"PNG reference: {len(pngs)} images ({args.images})")
    s_mu, s_sd = png_stats.mean(0), png_stats.std(0)
    print(
        "PNG input percentiles p1/p50/p99: "
        + " / ".join(f"{m:.3f}+-{s:.3f}" for m, s in zip(s_mu, s_sd, strict=True))
    )
    lo, med, hi = np.percentile(png_probs, (5, 50, 95), axis=0)
    for j, name in enumerate(names):
        print(f"  PNG {name:13s} p5 {lo[j]:.3f}  median {med[j]:.3f}  p95 {hi[j]:.3f}")
    if png_ood[0] is not None:
        arr = np.asarray(png_ood, dtype=np.float64)
        print(f"  PNG OOD score: median {np.median(arr):.2f}  p95 {np.percentile(arr, 95):.2f}")

    files = [args.dicom_dir / n for n in CHEST_DICOMS + OTHER_DICOMS]
    files = [f for f in files if f.is_file()]
    stats, probs, ood = run(files)
    z = (_logit(probs) - mu) / sd
    print()
    header = "file".ljust(32) + "p1/p50/p99".ljust(20)
    header += "".join(f"{n[:11]:>24s}" for n in names) + "   OOD"
    print(header)
    rows = []
    for i, path in enumerate(files):
        cells = "".join(f"{probs[i, j]:>14.3g} (z {z[i, j]:+5.1f})" for j in range(len(names)))
        score = "" if ood[i] is None else f"{ood[i]:6.2f}"
        pct = "/".join(f"{v:.2f}" for v in stats[i])
        print(f"{path.name[:31]:32s}{pct:20s}{cells}   {score}")
        rows.append(
            {
                "file": path.name,
                "chest": path.name in CHEST_DICOMS,
                "input_percentiles": [float(v) for v in stats[i]],
                "probabilities": dict(zip(names, map(float, probs[i]), strict=True)),
                "logit_z": dict(zip(names, map(float, z[i]), strict=True)),
                "ood": ood[i],
            }
        )
    chest = np.array([r["chest"] for r in rows])
    gap = float(np.abs(z[chest]).mean())
    worst = float(np.abs(z[chest]).max())
    print(f"\nchest DICOMs: mean |logit z| {gap:.2f}, max {worst:.2f} (PNG test images: ~0.8)")
    if args.json:
        out = {
            "checkpoint": spec.display_name,
            "png_reference": len(pngs),
            "png_input_percentiles_mean": [float(v) for v in s_mu],
            "png_input_percentiles_sd": [float(v) for v in s_sd],
            "png_prob_p5_p50_p95": [[float(v) for v in r] for r in (lo, med, hi)],
            "png_ood": [v for v in png_ood if v is not None and math.isfinite(v)],
            "files": rows,
            "chest_mean_abs_z": gap,
            "chest_max_abs_z": worst,
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
