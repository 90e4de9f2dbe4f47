"""Readers' verdicts over HTTP: ``POST`` and ``GET /api/studies/{study_uid}/feedback``.

``POST`` takes ``{"finding": NAME, "verdict": "present" | "absent" | "unsure", "note":
optional}`` from a principal with the role ``reader`` or ``admin``
(:mod:`dicom_node.web.access`) and appends one verdict under the principal's user name
(:class:`triage_core.worklist.feedback.Feedback`). The body is read up to :data:`MAX_BODY`
bytes and no further (413 beyond); the note is bounded by
:data:`~triage_core.worklist.feedback.MAX_NOTE` characters and never logged. ``GET`` returns the
verdicts, oldest first, each with ``finding``, ``verdict``, ``user``, ``at``, ``model``,
``model_version`` (and ``probability``, ``note``), and the final verdict per finding.

Answers: 201 the stored verdict; 401/403 without a reader's token; 404 unknown study; 409 a
study not processed; 413 a body too large; 422 a bad UID, body, finding, verdict or note.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from dicom_node.web.access import principal_of
from triage_core.uids import is_valid_uid
from triage_core.worklist.feedback import MAX_NOTE, FeedbackRefused, StudyNotFound

if TYPE_CHECKING:
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

#: Largest request body read (bytes): a finding name, a verdict and a note of MAX_NOTE
#: characters fit several times over.
MAX_BODY = 16 * 1024


class FeedbackIn(BaseModel):
    """One verdict as a reader sends it."""

    model_config = {"extra": "forbid"}

    finding: str = Field(
        min_length=1,
        max_length=64,
        description="a finding of the study, or another ChestX-ray14 finding",
    )
    verdict: Literal["present", "absent", "unsure"]
    note: str | None = Field(None, max_length=MAX_NOTE, description="free text, never logged")


class VerdictOut(BaseModel):
    """One stored verdict."""

    id: int
    finding: str
    verdict: str
    user: str
    at: str | None = Field(description="ISO 8601 UTC")
    model: str = Field(description="name of the model whose score the reader saw")
    model_version: str
    probability: float | None = Field(description="that score; null for another finding")
    note: str


class FinalVerdict(BaseModel):
    """A finding's final verdict: each reader's latest, combined."""

    verdict: str = Field(description="present, absent, unsure, or disputed (readers disagree)")
    by: dict[str, str] = Field(description="user -> that user's latest verdict")


class FeedbackPage(BaseModel):
    """Every verdict on one study."""

    study_uid: str
    count: int
    verdicts: list[VerdictOut]
    final: dict[str, FinalVerdict]


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


async def _bounded_body(request: Request) -> bytes | None:
    """The body, or ``None`` when it is longer than :data:`MAX_BODY`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def feedback_router(worklist: Worklist) -> APIRouter:
    """``POST`` and ``GET /api/studies/{study_uid}/feedback``."""
    router = APIRouter()
    errors: dict[int | str, dict[str, Any]] = {
        code: {"description": text}
        for code, text in (
            (401, "no access token"),
            (403, "the token's role may not give feedback"),
            (404, "unknown study"),
            (409, "study not processed"),
            (413, "body too large"),
            (422, "bad UID, body, finding, verdict or note"),
        )
    }

    @router.post(
        "/api/studies/{study_uid}/feedback",
        status_code=201,
        response_model=VerdictOut,
        responses=errors,
        summary="A reader's verdict on one finding (append-only; the latest counts)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}},
            }
        },
    )
    async def post_feedback(
        request: Request, study_uid: str = Path(description="Study Instance UID")
    ) -> Any:
        principal = principal_of(request)
        if not principal.name or not principal.may("reader"):
            return _error(
                403,
                "giving feedback needs a reader's token (triage token add NAME --role reader); "
                f"this request is {'user ' + principal.name if principal.name else 'anonymous'} "
                f"with the role {principal.role}",
            )
        if not is_valid_uid(study_uid):
            return _error(422, "not a valid Study Instance UID")
        body = await _bounded_body(request)
        if body is None:
            return _error(413, f"request body over {MAX_BODY} bytes")
        try:
            data = FeedbackIn.model_validate(json.loads(body))
        except (ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, ValidationError):
                return _error(422, _validation_message(exc))
            return _error(422, "body is not JSON")
        try:
            stored = await run_in_threadpool(
                worklist.feedback.add,
                study_uid,
                data.finding,
                data.verdict,
                principal.name,
                data.note or "",
            )
        except StudyNotFound:
            return _error(404, f"study {study_uid} not found")
        except FeedbackRefused as exc:
            return _error(exc.status, str(exc))
        logger.info(
            "verdict %s on %s of study %s by %s",
            data.verdict,
            data.finding,
            study_uid,
            principal.name,
        )
        return JSONResponse(status_code=201, content=stored)

    @router.get(
        "/api/studies/{study_uid}/feedback",
        response_model=FeedbackPage,
        responses={404: errors[404], 422: errors[422]},
        summary="Readers' verdicts on one study, oldest first, and the final verdicts",
    )
    def get_feedback(study_uid: str = Path(description="Study Instance UID")) -> Any:
        if not is_valid_uid(study_uid):
            return _error(422, "not a valid Study Instance UID")
        if worklist.feedback.study_status(study_uid) is None:
            return _error(404, f"study {study_uid} not found")
        verdicts = worklist.feedback.for_study(study_uid)
        return {
            "study_uid": study_uid,
            "count": len(verdicts),
            "verdicts": verdicts,
            "final": worklist.feedback.final_verdicts(study_uid),
        }

    return router


def page_context(worklist: Worklist, study_uid: str, request: Request) -> dict[str, Any]:
    """What the study page shows of the feedback: the verdicts, the final ones, this user's
    latest per finding, whether this user may judge, and the "other finding" names."""
    from triage_core.worklist.feedback import NIH_FINDINGS, VERDICTS

    principal = principal_of(request)
    verdicts = worklist.feedback.for_study(study_uid)
    mine: dict[str, str] = {}
    for v in verdicts:
        if principal.name and v["user"] == principal.name:
            mine[v["finding"]] = v["verdict"]
    return {
        "feedback": {
            "verdicts": verdicts,
            "final": worklist.feedback.final_verdicts(study_uid),
            "mine": mine,
            "can_judge": bool(principal.name) and principal.may("reader"),
            "user": principal.name,
            "role": principal.role,
            "choices": VERDICTS,
            "other_findings": NIH_FINDINGS,
            "max_note": MAX_NOTE,
        }
    }
