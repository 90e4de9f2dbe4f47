"""The model of a node: loaded once per process, warmed up, described in the start-up log."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings
    from triage_core.inference import Predictor
    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)


def describe_model(spec: ModelSpec, path: Path | None) -> str:
    """A one-paragraph model card for the start-up log."""
    parts = [
        f"model {spec.display_name} ({spec.arch}, {spec.task}, {spec.input_size} px)",
        f"checkpoint {path}" if path else "",
        "classes "
        + ", ".join(
            f"{n} (threshold {t:.3f}, weight {w:g})"
            for n, t, w in zip(
                spec.class_names, spec.thresholds, spec.priority_weights, strict=True
            )
        ),
        f"temperature {spec.temperature:g}",
    ]
    metrics = spec.metrics if isinstance(spec.metrics, dict) else {}
    oof, test = metrics.get("oof"), metrics.get("test")
    if isinstance(oof, dict) and "mean_auroc" in oof:
        parts.append(f"out-of-fold mean AUROC {float(oof['mean_auroc'][0]):.3f}")
    elif isinstance(test, dict) and "mean_auroc" in test:
        parts.append(
            f"test mean AUROC {float(test['mean_auroc']):.3f} ({test.get('images')} images)"
        )
    if path is not None:
        from triage_core.models import model_card_path

        card = model_card_path(path)
        parts.append(f"model card {card}" if card else "no model card beside the checkpoint")
    if spec.code_version:
        parts.append(f"code {spec.code_version}")
    return "; ".join(p for p in parts if p)


def load_predictor(settings: NodeSettings, model_path: Path | None) -> Predictor:
    """Load the model once for the process and warm it up; worker threads share it.

    ``Predictor`` serialises forward passes with its own lock and PyTorch already uses every
    core for one batch, so several copies would only cost memory; the threads still overlap
    reading and decoding images with another study's inference.
    """
    from triage_core.inference import Predictor
    from triage_core.runtime import SessionOptions

    started = time.perf_counter()
    # Default: leave one core to the C-STORE and network threads (OpenMP threads that
    # compete for every core collapse under load: measured 1 image/s instead of 40 with
    # 2 threads on 2 busy cores).
    threads = settings.threads or max(1, (os.cpu_count() or 1) - 1)
    predictor = Predictor(
        model_path,
        device=settings.device,
        threads=threads,
        batch_size=settings.batch_size,
        runtime=settings.runtime,
        session=SessionOptions(
            threads=threads,
            optimization=settings.ort_optimization,
            memory_arena=settings.ort_memory_arena,
        ),
    )
    warm_up(predictor, with_cam=settings.with_cam)
    logger.info(
        "%s (loaded in %.1f s, runtime %s, device %s, %d thread(s), mode %s)",
        describe_model(predictor.spec, model_path),
        time.perf_counter() - started,
        settings.runtime,
        settings.device,
        threads,
        getattr(predictor, "mode", "?"),
    )
    return predictor


def warm_up(predictor: Predictor, with_cam: bool) -> None:
    """Pay one-time costs before the first study: first forward, the CAM (Grad-CAM import and
    hooks with torch), the pipeline modules. The first study then takes as long as the next
    ones. (highdicom is imported by the outputs process, not here.)"""
    import numpy as np

    started = time.perf_counter()
    predictor.warmup()
    if with_cam:
        size = predictor.spec.input_size
        image = np.random.default_rng(0).random((size, size)).astype(np.float32)
        predictor.explainer().explain(image, 0)
    from triage_core import pipeline  # noqa: F401 - imported for its import time only

    logger.info("warm-up done in %.1f s", time.perf_counter() - started)
