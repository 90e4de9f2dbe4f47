"""HTTP JSON API over the worklist (FastAPI, reads plus readers' verdicts), health, metrics.

Build the application with :func:`create_app` from the process-wide
:class:`~triage_core.worklist.Worklist` and :class:`~dicom_node.metrics.Metrics`: one router for
the worklist (:func:`worklist_router`), one for operations (:func:`operations_router`); query
parameters are checked by small parsers (:func:`parse_statuses`, :func:`parse_min_priority`)
whose :class:`BadQuery` answers 422. :class:`dicom_node.web.server.HttpApi` is the component that
``triage serve`` runs under uvicorn in a thread, on 127.0.0.1 by default. Nothing is built at
import time; import this module only where the HTTP API is served (FastAPI takes about 0.3 s to
import).

Endpoints
---------
``GET /api/worklist?status=&min_priority=&limit=``
    ``{"count": N, "items": [row, ...]}``, rows ordered by effective priority (score plus aging,
    highest first, unscored studies last) then arrival. ``status`` is one lifecycle status or a
    comma-separated list; ``min_priority`` a number (effective priority) or a level name
    (``routine``, ``urgent``, ``critical``); ``limit`` 1 to 1000 (default 50).
``GET /api/studies/{study_uid}``
    One study with findings, per-image results, deliveries and timings; 404 (JSON) when unknown,
    422 (JSON) when the UID breaks the DICOM UID grammar.
``POST /api/studies/{study_uid}/feedback``, ``GET /api/studies/{study_uid}/feedback``
    A reader's verdict on one finding, and the verdicts of a study (see
    :mod:`dicom_node.web.feedback`: the only endpoint that writes; it needs a reader's token).
``GET /healthz``
    ``{"status": "ok", "database": "ok", "model": "ready"}`` when the database answers, else 503
    ``{"status": "error", ...}``; ``model`` is ``loading``, ``ready`` or ``failed: ...``.
``GET /healthz/live``
    200 ``{"status": "live"}`` while the process answers (no database call): liveness.
``GET /healthz/ready``
    200 when the database answers and the model serves, else 503 with the reason: readiness.
``GET /metrics``
    Prometheus text exposition (see :mod:`dicom_node.metrics`).
``GET /openapi.json``, ``GET /docs``
    The OpenAPI document and its browser view, as FastAPI provides them.

Database errors answer 503 with a JSON ``detail``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from dicom_node.metrics import Metrics
from triage_core import __version__
from triage_core.errors import WorklistError
from triage_core.spec import PRIORITY_LEVELS
from triage_core.worklist import STUDY_STATUSES, is_valid_uid

if TYPE_CHECKING:
    from collections.abc import Callable

    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

#: Pass as ``aging`` to :func:`create_app` to use ``triage_core.priority.AgingRule()``.
DEFAULT_AGING = "default"
MAX_LIMIT = 1000


class FindingSummary(BaseModel):
    """A study-level finding as shown in the worklist."""

    probability: float = Field(description="calibrated probability, 0 to 1")
    present: bool = Field(description="probability at or above the checkpoint's threshold")


class FindingDetail(FindingSummary):
    """A study-level finding with its operating threshold and source image."""

    threshold: float
    source_uid: str = Field(description="SOP Instance UID of the image that gave the maximum")


class WorklistRow(BaseModel):
    """One study in the worklist."""

    study_uid: str
    status: str = Field(description="receiving, queued, processing, done, not_eligible, failed")
    reason: str = Field(description="why the study is not eligible, if so")
    error: str = Field(description="last processing error, if any")
    priority_score: float | None = Field(description="0-100, null before inference")
    effective_priority: float | None = Field(description="score plus aging")
    priority_level: str | None = Field(description="routine, urgent or critical")
    low_confidence: bool = Field(
        description="some image is unlike the model's training images (out-of-distribution "
        "score above the checkpoint's threshold): do not trust its scores"
    )
    ood_score: float | None = Field(
        description="highest out-of-distribution score of the study's images (about 1 for a "
        "typical chest film); null when the model has no reference"
    )
    findings: dict[str, FindingSummary]
    model_name: str
    model_version: str
    num_instances: int
    received_at: str | None = Field(description="first instance, ISO 8601 UTC")
    updated_at: str | None
    accession_hash: str = Field(description="salted hash of the accession number, never the number")


class WorklistPage(BaseModel):
    """A page of the worklist."""

    count: int
    items: list[WorklistRow]


class ImageRow(BaseModel):
    """One received instance and, once processed, its per-image result."""

    sop_uid: str
    series_uid: str
    sop_class_uid: str
    received_at: str | None
    eligible: bool | None = Field(description="null until the study is processed")
    reason: str
    probabilities: dict[str, float]
    error: str


class DeliveryStatus(BaseModel):
    """One result object sent (or to send) to one destination."""

    id: int
    sop_uid: str
    destination: str
    status: str = Field(description="pending, sent or failed")
    attempts: int
    next_attempt_at: str | None
    last_error: str
    sent_at: str | None


class StudyDetail(WorklistRow):
    """Everything known about one study."""

    findings: dict[str, FindingDetail]  # type: ignore[assignment]
    images: list[ImageRow]
    deliveries: list[DeliveryStatus]
    timings: dict[str, float] = Field(description="seconds per pipeline stage")
    attempts: int
    lease_owner: str | None
    lease_expires_at: str | None
    queued_at: str | None
    completed_at: str | None


class ErrorBody(BaseModel):
    """An error answer."""

    detail: str


class BadQuery(ValueError):
    """A query parameter we cannot use (answered 422 with its message)."""


def _resolve_aging(aging: Any) -> Any:
    if isinstance(aging, str) and aging == DEFAULT_AGING:
        from triage_core.priority import AgingRule

        return AgingRule()
    return aging


def parse_statuses(text: str | None) -> list[str] | None:
    """``"queued,done"`` -> ``["queued", "done"]``; ``None`` -> every status."""
    if text is None:
        return None
    statuses = [s.strip() for s in text.split(",") if s.strip()]
    if not statuses or any(s not in STUDY_STATUSES for s in statuses):
        raise BadQuery(f"unknown status {text!r}; use {', '.join(STUDY_STATUSES)}")
    return statuses


def parse_min_priority(text: str | None) -> float | str | None:
    """A level name (``urgent``) or a number (effective priority); ``None`` -> no minimum."""
    if text is None or text in PRIORITY_LEVELS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value:  # not a number, or NaN
        raise BadQuery(
            f"min_priority {text!r} is neither a number nor one of {', '.join(PRIORITY_LEVELS)}"
        )
    return value


def worklist_router(worklist: Worklist, aging: Any) -> APIRouter:
    """``/api/worklist`` and ``/api/studies/{study_uid}``."""
    router = APIRouter()

    @router.get(
        "/api/worklist",
        response_model=WorklistPage,
        responses={422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
        summary="Studies ordered by effective priority, then arrival",
    )
    def get_worklist(
        status: str | None = Query(
            None, description=f"one of {', '.join(STUDY_STATUSES)} (comma-separated for several)"
        ),
        min_priority: str | None = Query(
            None,
            description="minimum effective priority (number) or level "
            f"({', '.join(PRIORITY_LEVELS)})",
        ),
        limit: int = Query(50, ge=1, le=MAX_LIMIT),
    ) -> Any:
        rows = worklist.queries.list_worklist(
            status=parse_statuses(status),
            min_priority=parse_min_priority(min_priority),
            limit=limit,
            aging=aging,
        )
        return {"count": len(rows), "items": rows}

    @router.get(
        "/api/studies/{study_uid}",
        response_model=StudyDetail,
        responses={404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
        summary="One study: findings, per-image results, deliveries, timings",
    )
    def get_study(study_uid: str = Path(description="Study Instance UID")) -> Any:
        if not is_valid_uid(study_uid):
            raise BadQuery(f"{study_uid!r} is not a valid DICOM UID")
        detail = worklist.queries.study_detail(study_uid, aging=aging)
        if detail is None:
            return JSONResponse(status_code=404, content={"detail": f"study {study_uid} not found"})
        return detail

    return router


def operations_router(
    worklist: Worklist, metrics: Metrics, readiness: Callable[[], str] | None = None
) -> APIRouter:
    """``/healthz`` (database check), ``/healthz/live``, ``/healthz/ready`` and ``/metrics``.

    ``readiness`` returns the model's state (``ready``, ``loading``, ``failed: ...``); ``None``
    (no workers in this process): always ``ready``."""
    router = APIRouter()

    def database_ok() -> bool:
        try:
            worklist.ping()
        except WorklistError as exc:
            logger.warning("health check failed: %s", exc)
            return False
        return True

    @router.get("/healthz", summary="Database check and model state")
    def healthz() -> JSONResponse:
        model = readiness() if readiness is not None else "ready"
        if not database_ok():
            return JSONResponse(
                status_code=503,
                content={"status": "error", "database": "unreachable", "model": model},
            )
        return JSONResponse(content={"status": "ok", "database": "ok", "model": model})

    @router.get("/healthz/live", summary="Liveness: the process answers")
    def live() -> JSONResponse:
        return JSONResponse(content={"status": "live"})

    @router.get("/healthz/ready", summary="Readiness: database answers and the model serves")
    def ready() -> JSONResponse:
        model = readiness() if readiness is not None else "ready"
        database = database_ok()
        ok = database and model == "ready"
        return JSONResponse(
            status_code=200 if ok else 503,
            content={
                "status": "ready" if ok else "not ready",
                "database": "ok" if database else "unreachable",
                "model": model,
            },
        )

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    def get_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    return router


async def _bad_query(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(exc)})


async def _worklist_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.error("worklist error while answering HTTP: %s", exc)
    return JSONResponse(status_code=503, content={"detail": "worklist database unavailable"})


def create_app(
    worklist: Worklist,
    metrics: Metrics | None = None,
    *,
    aging: Any = DEFAULT_AGING,
    title: str = "cxr-triage",
    readiness: Callable[[], str] | None = None,
) -> FastAPI:
    """Build the FastAPI application (the worklist, readers' verdicts, health, metrics).

    Parameters
    ----------
    worklist : Worklist
        The process-wide worklist (one engine, shared by every request).
    metrics : Metrics, optional
        The node's metrics; a fresh object reading DB gauges from ``worklist`` when omitted.
        A given object without a worklist gets ``worklist`` attached.
    aging : AgingRule, callable or None
        How waiting raises the effective priority (``DEFAULT_AGING``: ``AgingRule()``; ``None``:
        no aging).
    title : str
        Title of the OpenAPI document.
    readiness : callable, optional
        The model's state for ``/healthz`` and ``/healthz/ready`` (see
        :func:`operations_router`).

    Returns
    -------
    FastAPI
        The application; serve it with uvicorn.
    """
    if metrics is None:
        metrics = Metrics(worklist)
    elif not metrics.has_worklist:
        metrics.attach_worklist(worklist)
    app = FastAPI(
        title=title,
        version=__version__,
        description="Priority worklist of the cxr-triage DICOM node, and readers' verdicts. "
        "Results are decision support, not a diagnosis.",
    )
    app.add_exception_handler(BadQuery, _bad_query)
    app.add_exception_handler(WorklistError, _worklist_error)
    app.include_router(worklist_router(worklist, _resolve_aging(aging)))
    app.include_router(operations_router(worklist, metrics, readiness))
    from dicom_node.web.feedback import feedback_router

    app.include_router(feedback_router(worklist))
    return app
