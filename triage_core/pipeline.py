"""Studies through the whole triage chain, as plain functions (the node's workers and
``triage predict`` both run it).

:func:`triage_study` (one study) and :func:`triage_studies` (several, sharing one batched
forward pass) chain the stages, each with an explicit contract:

1. **read**: every instance, by its input kind (:data:`INPUT_KINDS`): a DICOM file with
   ``imaging.read_dataset``, a PNG/JPEG export with ``imaging.load_raster``; an unreadable
   file becomes an :class:`~triage_core.spec.ImageResult` with ``error`` (never an exception);
2. **select**: ``imaging.check_eligibility`` for DICOM; a non-eligible image keeps its
   ``reason``. A PNG/JPEG has no header to check: it is taken to be a frontal chest film, as
   the exports the model learnt from are;
3. **preprocess**: ``imaging.load_image`` (DICOM) + ``imaging.to_array`` for the eligible ones
   (a pixel decoding failure is again an ``error`` on that image);
4. **infer**: one batched :meth:`Predictor.predict_with_features` call: calibrated
   probabilities, and the out-of-distribution score of each image (:mod:`triage_core.ood`) from
   the same pass's activations; above the checkpoint's threshold an image is
   ``low_confidence`` (and so is the study: ``StudyResult.low_confidence``);
5. **aggregate + score**: ``aggregation.aggregate_study`` (per finding, the maximum over the
   eligible images, remembering the image) and ``priority.score_study``;
6. **explain**: the class activation map, for the top finding's class, on the image that gave
   the top finding, as an RGB overlay at that image's resolution (or scaled down to
   ``cam_max_side``). The map is computed from the target layer's activations captured in
   step 4 (:meth:`Predictor.predict_with_features`), so no second pass through the backbone is
   needed; when the model's head cannot be separated, a full Grad-CAM pass is run instead.
   The heat map itself is kept too (the Parametric Map), and so is the map of every other
   finding judged present, each on the image that gave it (their image regions in the SR).

Per-stage wall times (seconds) are in ``StudyResult.timings`` (``read``, ``preprocess``,
``inference``, ``cam``, ``total``; studies triaged together report the time of the pass they
shared as their ``inference``). A study without any usable eligible image is returned with
``status="not_eligible"`` and the reasons (and read errors) joined in ``reason``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydicom.dataset import Dataset

from triage_core.errors import ImageReadError, TriageError
from triage_core.spec import Finding, ImageResult, StudyResult

if TYPE_CHECKING:
    from triage_core.cam import CamResult
    from triage_core.inference import Predictor

logger = logging.getLogger(__name__)

#: How the chain reads its input files: ``dicom`` (the node's spool: DICOM only), ``raster``
#: (PNG/JPEG exports) or ``auto`` (per file: a PNG/JPEG by suffix or content, else DICOM; what
#: ``triage predict`` uses).
INPUT_KINDS: tuple[str, ...] = ("dicom", "raster", "auto")
InputKind = Literal["dicom", "raster", "auto"]
#: One study for :func:`triage_studies`: its UID and its ``(instance UID, file)`` pairs.
StudyInput = tuple[str, Sequence[tuple[str, Path]]]

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
        uint8 ``H x W x 3`` RGB overlay of the class activation map at the source image's
        resolution, or scaled down so its longer side is ``cam_max_side`` (``None`` without
        eligible images, with ``with_cam=False``, or when the map failed: see ``cam_error``).
    cam_source_uid : str
        SOP Instance UID of the image the overlay was made on ("" without overlay).
    cam_finding : Finding or None
        The explained finding (the study's top finding; check ``present`` before sending).
    cam_heatmap : numpy.ndarray or None
        float32 map (same grid as ``cam_overlay``, [0, 1]) behind the overlay.
    finding_maps : dict of str to (str, numpy.ndarray)
        For each finding judged present (with the overlay's finding among them when present):
        the SOP Instance UID of the image that gave it and its map on that image, on the
        overlay's scale (``cam_max_side``).
    cam_error : str
        Why the map failed ("" when it did not).
    datasets : dict of str to pydicom.Dataset
        The source data sets that could be read, by SOP Instance UID (DICOM inputs only).
    """

    result: StudyResult
    cam_overlay: np.ndarray | None = None
    cam_source_uid: str = ""
    cam_finding: Finding | None = None
    cam_heatmap: np.ndarray | None = None
    finding_maps: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    cam_error: str = ""
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


@dataclass
class _Study:
    """One study between the stages: per-image results so far (instance order, duplicates
    dropped), its readable data sets, its batch and its timings."""

    uid: str
    instances: Sequence[tuple[str, Path]]
    results: dict[str, ImageResult] = field(default_factory=dict)
    datasets: dict[str, Dataset] = field(default_factory=dict)
    rasters: dict[str, np.ndarray] = field(default_factory=dict)
    eligible: list[str] = field(default_factory=list)
    batch: _Batch = field(default_factory=_Batch)
    timings: dict[str, float] = field(default_factory=dict)


def triage_study(
    study_uid: str,
    instances: Sequence[tuple[str, Path]],
    predictor: Predictor,
    *,
    with_cam: bool = True,
    cam_max_side: int | None = None,
    kind: InputKind = "dicom",
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
        Compute the class activation map overlay of the top finding.
    cam_max_side : int, optional
        Longest side of the overlay (aspect ratio kept); ``None`` keeps the source's size.
    kind : str
        How the files are read, one of :data:`INPUT_KINDS`.

    Returns
    -------
    StudyOutput
        Never raises for bad input files: they are recorded per image.
    """
    (output,) = triage_studies(
        [(study_uid, instances)],
        predictor,
        with_cam=with_cam,
        cam_max_side=cam_max_side,
        kind=kind,
    )
    return output


def triage_studies(
    studies: Sequence[StudyInput],
    predictor: Predictor,
    *,
    with_cam: bool = True,
    cam_max_side: int | None = None,
    kind: InputKind = "dicom",
) -> list[StudyOutput]:
    """Triage several studies, their eligible images in one batched forward pass.

    Each study gets exactly what :func:`triage_study` would give it (``triage predict`` triages
    each file as a one-image study, a chunk of files at a time).

    Parameters
    ----------
    studies : sequence of (str, sequence of (str, Path))
        ``(Study Instance UID, instances)`` per study.
    predictor, with_cam, cam_max_side, kind
        As for :func:`triage_study`.

    Returns
    -------
    list of StudyOutput
        In the order of ``studies``.

    Raises
    ------
    ValueError
        Unknown ``kind``.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; expected one of {INPUT_KINDS}")
    prepared = []
    for study_uid, instances in studies:
        study = _Study(study_uid, instances)
        mark = time.perf_counter()
        _read_and_select(study, kind)
        study.timings["read"] = time.perf_counter() - mark
        mark = time.perf_counter()
        _preprocess(study, predictor)
        study.timings["preprocess"] = time.perf_counter() - mark
        prepared.append(study)
    mark = time.perf_counter()
    _infer(prepared, predictor)
    elapsed = time.perf_counter() - mark
    for study in prepared:
        study.timings["inference"] = elapsed
    return [_finish(study, predictor, with_cam, cam_max_side) for study in prepared]


def _read_and_select(study: _Study, kind: InputKind) -> None:
    """Stages 1-2: read every instance and check its eligibility."""
    from triage_core.imaging import check_eligibility, is_raster, load_raster, read_dataset

    for uid, path in study.instances:
        if uid in study.results:
            logger.warning("study %s: instance %s listed twice; using the first", study.uid, uid)
            continue
        raster = kind == "raster" or (kind == "auto" and is_raster(path))
        try:
            if raster:
                study.rasters[uid] = load_raster(path)
            else:
                study.datasets[uid] = read_dataset(path)
        except ImageReadError as exc:
            logger.warning("study %s: instance %s unreadable: %s", study.uid, uid, exc.cause)
            study.results[uid] = ImageResult(
                uid=uid, eligible=False, reason="unreadable", error=_without_path(exc)
            )
            continue
        if raster:  # an export of a frontal chest film: nothing in it to check
            ok, reason = True, ""
        else:
            try:
                ok, reason = check_eligibility(study.datasets[uid])
            except _MALFORMED as exc:  # a header value pydicom cannot convert
                logger.warning(
                    "study %s: instance %s has a malformed header: %s", study.uid, uid, exc
                )
                study.results[uid] = ImageResult(
                    uid=uid, eligible=False, reason="malformed header", error=_without_path(exc)
                )
                continue
        study.results[uid] = ImageResult(uid=uid, eligible=ok, reason=reason)
        if ok:
            study.eligible.append(uid)


def _preprocess(study: _Study, predictor: Predictor) -> None:
    """Stage 3: pixels to model inputs; an undecodable image becomes an error in the results."""
    from triage_core.imaging import load_image, to_array

    batch = study.batch
    for uid in study.eligible:
        try:
            image = study.rasters.pop(uid, None)
            if image is None:
                image = load_image(study.datasets[uid])
            tensor = to_array(image, predictor.spec)
        except _UNDECODABLE as exc:
            logger.warning("study %s: instance %s not decodable: %s", study.uid, uid, exc)
            study.results[uid] = ImageResult(
                uid=uid, eligible=False, reason="pixel data not decodable", error=_without_path(exc)
            )
            continue
        batch.uids.append(uid)
        batch.images[uid] = image
        batch.tensors.append(tensor)


def _infer(studies: Sequence[_Study], predictor: Predictor) -> None:
    """Stage 4: one batched pass over every study's eligible images; probabilities, OOD scores
    and CAM activations."""
    tensors = [tensor for study in studies for tensor in study.batch.tensors]
    if not tensors:
        return
    from triage_core import ood

    stacked = np.stack(tensors)
    probs, features = predictor.predict_with_features(stacked)
    spec = predictor.spec
    scores: np.ndarray | None = None
    if spec.ood:
        if features is not None:
            scores = ood.scores_from_features(spec, features)
        else:  # the compiled graph kept no activations: one more (fp32) pass
            scores = predictor.ood_scores(stacked)
    limit = ood.threshold(spec)
    start = 0
    for study in studies:
        batch = study.batch
        stop = start + len(batch.uids)
        if features is not None:
            batch.features = features[start:stop]
        for i, (uid, row) in enumerate(zip(batch.uids, probs[start:stop], strict=True)):
            score = None if scores is None else float(scores[start + i])
            study.results[uid] = ImageResult(
                uid=uid,
                eligible=True,
                probabilities={n: float(p) for n, p in zip(spec.class_names, row, strict=True)},
                ood_score=score,
                low_confidence=score is not None and limit is not None and score > limit,
            )
        start = stop


def _finish(
    study: _Study, predictor: Predictor, with_cam: bool, cam_max_side: int | None
) -> StudyOutput:
    """Stages 5-6 for one study, and its result."""
    from triage_core.aggregation import aggregate_study
    from triage_core.priority import score_study

    spec = predictor.spec
    timings = study.timings
    mark = time.perf_counter()
    ordered = tuple(study.results.values())  # instance order, duplicates dropped
    findings = aggregate_study(ordered, spec)
    score, level = score_study(findings, spec)
    scoring = time.perf_counter() - mark

    mark = time.perf_counter()
    explained: tuple[np.ndarray, str, Finding, np.ndarray] | None = None
    finding_maps: dict[str, tuple[str, np.ndarray]] = {}
    cam_error = ""
    if with_cam and findings:
        try:
            explained = _explain(study, findings, predictor, cam_max_side)
            finding_maps = _present_maps(study, findings, predictor, cam_max_side, explained)
        except TriageError as exc:
            logger.error("study %s: Grad-CAM failed: %s", study.uid, exc)
            cam_error = str(exc)
    timings["cam"] = time.perf_counter() - mark
    timings["total"] = sum(timings.values()) + scoring

    status = "done" if findings else "not_eligible"
    result = StudyResult(
        study_uid=study.uid,
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
        study.uid,
        status,
        score,
        level,
        len(study.batch.uids),
        len(study.instances),
        ", LOW CONFIDENCE (unlike the training images)" if result.low_confidence else "",
        timings["total"],
    )
    output = StudyOutput(result=result, cam_error=cam_error, datasets=study.datasets)
    if explained is not None:
        output.cam_overlay, output.cam_source_uid, output.cam_finding, output.cam_heatmap = (
            explained
        )
        output.finding_maps = finding_maps
    return output


def _explain(
    study: _Study, findings: Sequence[Finding], predictor: Predictor, cam_max_side: int | None
) -> tuple[np.ndarray, str, Finding, np.ndarray]:
    """Stage 6: the map of the top finding on the image that gave it: the overlay, that
    image's UID, the finding and the heat map (raises the explainer's ``TriageError``)."""
    top = max(findings, key=lambda f: f.probability)
    cam = _cam(study, top, predictor, cam_max_side)
    return cam.overlay, top.source_uid, top, cam.heatmap


def _cam(
    study: _Study, finding: Finding, predictor: Predictor, cam_max_side: int | None
) -> CamResult:
    batch = study.batch
    index = batch.uids.index(finding.source_uid)
    return predictor.explainer().explain(
        batch.images[finding.source_uid],
        predictor.spec.class_names.index(finding.name),
        tensor=batch.tensors[index],
        features=batch.features[index] if batch.features is not None else None,
        max_side=cam_max_side,
    )


def _present_maps(
    study: _Study,
    findings: Sequence[Finding],
    predictor: Predictor,
    cam_max_side: int | None,
    explained: tuple[np.ndarray, str, Finding, np.ndarray],
) -> dict[str, tuple[str, np.ndarray]]:
    """The map of every finding judged present, on its image (the top one's is reused)."""
    _, top_uid, top, top_map = explained
    maps: dict[str, tuple[str, np.ndarray]] = {}
    for finding in findings:
        if not finding.present or finding.source_uid not in study.batch.uids:
            continue
        if finding.name == top.name:
            maps[finding.name] = (top_uid, top_map)
        else:
            cam = _cam(study, finding, predictor, cam_max_side)
            maps[finding.name] = (finding.source_uid, cam.heatmap)
    return maps
