"""Does test-time augmentation or a seed ensemble pay for its inference cost?

``python benchmarks/bench_tta.py --models RUN_A/NAME [RUN_B/NAME ...] --images DIR --labels CSV``

On the validation split of the first checkpoint (the split every model must share; checked by
its fingerprint), measures the mean AUROC of:

* the first model alone (one forward pass per image);
* test-time augmentation: the mean logits over ``--views`` fixed small affine views (identity,
  scale 0.95 / 1.05, shifts of 3 % left/right and up/down; no flips: the heart is on the left);
* the seed ensemble: the mean logits of all ``--models``, one view each;

and the CPU milliseconds per image of each, measured in the same run (ratios are what counts).
Only validation data is touched: a method is adopted only when its gain is worth its cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VIEWS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.95, 0.0, 0.0),
    (1.05, 0.0, 0.0),
    (1.0, 0.03, 0.0),
    (1.0, -0.03, 0.0),
    (1.0, 0.0, 0.03),
    (1.0, 0.0, -0.03),
)


def _view(x: object, spec: object, scale: float, tx: float, ty: float) -> object:
    import torch
    import torch.nn.functional as F

    assert isinstance(x, torch.Tensor)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)  # type: ignore[attr-defined]
    std = torch.tensor(spec.std).view(1, 3, 1, 1)  # type: ignore[attr-defined]
    theta = torch.tensor([[1 / scale, 0.0, 2 * tx], [0.0, 1 / scale, 2 * ty]]).expand(len(x), 2, 3)
    raw = x.float() * std + mean
    grid = F.affine_grid(theta, list(raw.shape), align_corners=False)
    raw = F.grid_sample(raw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (raw - mean) / std


def _mean_auroc(y: np.ndarray, logits: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(y[:, k], logits[:, k]) for k in range(y.shape[1])]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--views", type=int, default=len(VIEWS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from training.data import attach_images, index_images, load_tensors
    from training.evaluate import rebuild_split
    from training.predict import predict_logits
    from triage_core.models import load_checkpoint

    torch.set_num_threads(args.threads)
    models = [load_checkpoint(m) for m in args.models]
    first_spec = models[0][1]
    fingerprint = first_spec.training["data"]["split"]["fingerprint"]
    for _, spec in models:
        if spec.training["data"]["split"]["fingerprint"] != fingerprint:
            raise SystemExit(f"{spec.name}: another split than the first model's")
    data = rebuild_split(first_spec, args.images, args.labels, "val")
    _, paths = attach_images(data.records, index_images(args.images))
    x = load_tensors(paths, first_spec)
    y = data.multi_hot()

    def timed(fn: object) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        out = fn()  # type: ignore[operator]
        return out, 1000 * (time.perf_counter() - started) / len(x)

    model, spec = models[0]
    single, ms_single = timed(lambda: predict_logits(model, x, channels_last=True))
    views = VIEWS[: args.views]
    tta, ms_tta = timed(
        lambda: np.mean(
            [
                predict_logits(model, _view(x, spec, *v), channels_last=True)  # type: ignore[arg-type]
                for v in views
            ],
            axis=0,
        )
    )
    ensemble, ms_ens = timed(
        lambda: np.mean([predict_logits(m, x, channels_last=True) for m, _ in models], axis=0)
    )
    report = {
        "cpu": _cpu_name(),
        "threads": args.threads,
        "val_images": len(x),
        "single": {"mean_auroc": _mean_auroc(y, single), "ms_per_image": ms_single},
        f"tta_{len(views)}_views": {"mean_auroc": _mean_auroc(y, tta), "ms_per_image": ms_tta},
        f"ensemble_{len(models)}_seeds": {
            "mean_auroc": _mean_auroc(y, ensemble),
            "ms_per_image": ms_ens,
            "members": [
                _mean_auroc(y, predict_logits(m, x, channels_last=True)) for m, _ in models
            ],
        },
    }
    print(json.dumps(report, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
