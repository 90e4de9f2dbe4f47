"""One study through the whole triage chain, as plain functions (used by the node's workers).

:func:`triage_study` chains the stages, each with an explicit contract:

1. **read**: ``imaging.read_dataset`` for every instance; an unreadable file becomes an
   :class:`~triage_core.spec.ImageResult` with ``error`` (never an exception);
2. **select**: ``imaging.check_eligibility``; a non-eligible image keeps its ``reason``;
3. **preprocess**: ``imaging.load_image`` + ``imaging.to_array`` for the eligible ones (a pixel
   decoding failure is again an ``error`` on that image);
4. **infer**: one batched :meth:`Predictor.predict_with_features` call: calibrated
   probabilities, and the out-of-distribution score of each image (:mod:`triage_core.ood`) from
   the same pass's activations; above the checkpoint's threshold an image is
   ``low_confidence`` (and so is the study: ``StudyResult.low_confidence``);
5. **aggregate + score**: ``aggregation.aggregate_study`` (per finding, the maximum over the
   eligible images, remembering the image) and ``priority.score_study``;
6. **explain**: Grad-CAM, for the top finding's class, on the image that gave the top finding,
   as an RGB overlay at that image's resolution (or scaled down to ``cam_max_side``). The map is
   computed from the target layer's activations captured in step 4
   (:meth:`Predictor.predict_with_features`), so no second pass through the backbone is needed;
   when the model's head cannot be separated, a full Grad-CAM pass is run instead.

Per-stage wall times (seconds) are in ``StudyResult.timings`` (``read``, ``preprocess``,
``inference``, ``cam``, ``total``). A study without any usable eligible image is returned with
``status="not_eligible"`` and the reasons (and read errors) joined in ``reason``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from triage_core.errors import ImageReadError, TriageError
from triage_core.spec import Finding, ImageResult, StudyResult

if TYPE_CHECKING:
    from triage_core.inference import Predictor

logger = logging.getLogger(__name__)

#: What pydicom/numpy raise on malformed values that slip past ``imaging``'s own checks; such an
#: instance is recorded as an error instead of failing the whole study.
_MALFORMED: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    OverflowError,
)
_UNDECODABLE: tuple[type[Exception], ...] = (ImageReadError, *_MALFORMED)


@dataclass
class StudyOutput:
    """What :func:`triage_study` hands to the output builders and the worklist.

    Attributes
    ----------
    result : StudyResult
        Findings, priority, per-image results, model identity and timings.
    cam_overlay : numpy.ndarray or None
        uint8 ``H x W x 3`` RGB Grad-CAM overlay at the source image's resolution, or scaled
        down so its longer side is ``cam_max_side`` (``None`` without eligible images, with
        ``with_cam=False``, or when Grad-CAM failed).
    cam_source_uid : str
        SOP Instance UID of the image the overlay was made on ("" without overlay).
    cam_finding : Finding or None
        The explained finding (the study's top finding; check ``present`` before sending).
    datasets : dict of str to pydicom.Dataset
        The source data sets that could be read, by SOP Instance UID.
    """

    result: StudyResult
    cam_overlay: np.ndarray | None = None
    cam_source_uid: str = ""
    cam_finding: Finding | None = None
    datasets: dict[str, Dataset] = field(default_factory=dict)


def _without_path(exc: Exception) -> str:
    """An error for the worklist, the API and the SR: the cause without the spool path (rows
    are keyed by SOP Instance UID; a path says where the node stores data, to anyone who reads
    the worklist)."""
    if isinstance(exc, ImageReadError):
        return f"{exc.__class__.__name__}: {exc.cause}"
    return f"{exc.__class__.__name__}: {exc}"


def _join_reasons(images: Sequence[ImageResult]) -> str:
    counts = Counter(
        f"unreadable ({im.error})" if im.error else (im.reason or "no usable image")
        for im in images
    )
    parts = [text if n == 1 else f"{text} x{n}" for text, n in counts.items()]
    return "; ".join(parts) or "no instances"


@dataclass
class _Batch:
    """The eligible images of a study on their way through preprocessing and inference."""

    uids: list[str] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    tensors: list[np.ndarray] = field(default_factory=list)
    features: np.ndarray | None = None


def triage_study(
    study_uid: str,
    instances: Sequence[tuple[str, Path]],
    predictor: Predictor,
    *,
    with_cam: bool = True,
    cam_max_side: int | None = None,
) -> StudyOutput:
    """Triage one study.

    Parameters
    ----------
    study_uid : str
        Study Instance UID (copied into the result).
    instances : sequence of (str, Path)
        ``(SOP Instance UID, file path)`` of every instance received for the study.
    predictor : Predictor
        The loaded model.
    with_cam : bool
        Compute the Grad-CAM overlay of the top finding.
    cam_max_side : int, optional
        Longest side of the overlay (aspect ratio kept); ``None`` keeps the source's size.

    Returns
    -------
    StudyOutput
        Never raises for bad input files: they are recorded per image.
    """
    from triage_core.aggregation import aggregate_study
    from triage_core.priority import score_study

    spec = predictor.spec
    timings: dict[str, float] = {}
    started = time.perf_counter()
    results, datasets, eligible = _read_and_select(study_uid, instances)
    timings["read"] = time.perf_counter() - started

    mark = time.perf_counter()
    batch = _preprocess(study_uid, eligible, datasets, predictor, results)
    timings["preprocess"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _infer(batch, predictor, results)
    timings["inference"] = time.perf_counter() - mark

    ordered = tuple(results.values())  # instance order, duplicates dropped
    findings = aggregate_study(ordered, spec)
    score, level = score_study(findings, spec)

    mark = time.perf_counter()
    explained = _explain(study_uid, findings, batch, predictor, cam_max_side) if with_cam else None
    timings["cam"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started

    status = "done" if findings else "not_eligible"
    result = StudyResult(
        study_uid=study_uid,
        status=status,
        reason="" if findings else _join_reasons(ordered),
        findings=findings,
        priority_score=score,
        priority_level=level,
        images=ordered,
        model_name=spec.name or spec.arch,
        model_version=spec.version,
        timings=timings,
    )
    logger.info(
        "study %s: %s, priority %.1f (%s), %d/%d images used%s, %.2f s",
        study_uid,
        status,
        score,
        level,
        len(batch.uids),
        len(instances),
        ", LOW CONFIDENCE (unlike the training images)" if result.low_confidence else "",
        timings["total"],
    )
    output = StudyOutput(result=result, datasets=datasets)
    if explained is not None:
        output.cam_overlay, output.cam_source_uid, output.cam_finding = explained
    return output


def _read_and_select(
    study_uid: str, instances: Sequence[tuple[str, Path]]
) -> tuple[dict[str, ImageResult], dict[str, Dataset], list[str]]:
    """Stages 1-2: read every instance and check its eligibility.

    Returns the per-image results so far (in instance order, duplicates dropped), the data sets
    that could be read and the UIDs of the eligible ones.
    """
    from triage_core.imaging import check_eligibility, read_dataset

    results: dict[str, ImageResult] = {}
    datasets: dict[str, Dataset] = {}
    eligible: list[str] = []
    for uid, path in instances:
        if uid in results:
            logger.warning("study %s: instance %s listed twice; using the first", study_uid, uid)
            continue
        try:
            ds = read_dataset(path)
        except ImageReadError as exc:
            logger.warning("study %s: instance %s unreadable: %s", study_uid, uid, exc.cause)
            results[uid] = ImageResult(
                uid=uid, eligible=False, reason="unreadable", error=_without_path(exc)
            )
            continue
        datasets[uid] = ds
        try:
            ok, reason = check_eligibility(ds)
        except _MALFORMED as exc:  # a header value pydicom cannot convert
            logger.warning("study %s: instance %s has a malformed header: %s", study_uid, uid, exc)
            results[uid] = ImageResult(
                uid=uid, eligible=False, reason="malformed header", error=_without_path(exc)
            )
            continue
        results[uid] = ImageResult(uid=uid, eligible=ok, reason=reason)
        if ok:
            eligible.append(uid)
    return results, datasets, eligible


def _preprocess(
    study_uid: str,
    eligible: Sequence[str],
    datasets: dict[str, Dataset],
    predictor: Predictor,
    results: dict[str, ImageResult],
) -> _Batch:
    """Stage 3: pixels to model inputs; an undecodable image becomes an error in ``results``."""
    from triage_core.imaging import load_image, to_array

    batch = _Batch()
    for uid in eligible:
        try:
            image = load_image(datasets[uid])
            tensor = to_array(image, predictor.spec)
        except _UNDECODABLE as exc:
            logger.warning("study %s: instance %s not decodable: %s", study_uid, uid, exc)
            results[uid] = ImageResult(
                uid=uid, eligible=False, reason="pixel data not decodable", error=_without_path(exc)
            )
            continue
        batch.uids.append(uid)
        batch.images[uid] = image
        batch.tensors.append(tensor)
    return batch


def _infer(batch: _Batch, predictor: Predictor, results: dict[str, ImageResult]) -> None:
    """Stage 4: one batched pass; probabilities, OOD scores and CAM activations."""
    if not batch.uids:
        return
    from triage_core import ood

    stacked = np.stack(batch.tensors)
    probs, batch.features = predictor.predict_with_features(stacked)
    spec = predictor.spec
    scores: np.ndarray | None = None
    if spec.ood:
        if batch.features is not None:
            scores = ood.scores_from_features(spec, batch.features)
        else:  # the compiled graph kept no activations: one more (fp32) pass
            scores = predictor.ood_scores(stacked)
    limit = ood.threshold(spec)
    for i, (uid, row) in enumerate(zip(batch.uids, probs, strict=True)):
        score = None if scores is None else float(scores[i])
        results[uid] = ImageResult(
            uid=uid,
            eligible=True,
            probabilities={name: float(p) for name, p in zip(spec.class_names, row, strict=True)},
            ood_score=score,
            low_confidence=score is not None and limit is not None and score > limit,
        )


def _explain(
    study_uid: str,
    findings: Sequence[Finding],
    batch: _Batch,
    predictor: Predictor,
    cam_max_side: int | None,
) -> tuple[np.ndarray, str, Finding] | None:
    """Stage 6: Grad-CAM of the top finding on the image that gave it (``None`` on failure)."""
    if not findings:
        return None
    top = max(findings, key=lambda f: f.probability)
    try:
        index = batch.uids.index(top.source_uid)
        cam = predictor.explainer().explain(
            batch.images[top.source_uid],
            predictor.spec.class_names.index(top.name),
            tensor=batch.tensors[index],
            features=batch.features[index] if batch.features is not None else None,
            max_side=cam_max_side,
        )
    except TriageError as exc:
        logger.error("study %s: Grad-CAM failed: %s", study_uid, exc)
        return None
    return cam.overlay, top.source_uid, top
