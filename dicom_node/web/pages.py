"""The HTML pages: the worklist (``/``), one study (``/studies/{uid}``), the model card.

Server-rendered with Jinja2 (autoescaped: every value from a DICOM header or an error text is
escaped); the only script is ``static/app.js``, which refreshes the worklist's table in place
every few seconds from ``/partials/worklist`` with the page's own query string, so the filters
survive a refresh. Pages show identifiers only: UIDs and accession hashes, never a name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.templating import Jinja2Templates

from dicom_node.dicomweb import images
from dicom_node.web import feedback, views
from dicom_node.web.viewer_install import is_installed
from triage_core.spec import PRIORITY_LEVELS
from triage_core.uids import is_valid_uid
from triage_core.worklist import STUDY_STATUSES

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
#: Rows fetched before the time filter; rows shown at most.
FETCH_LIMIT = 1000
SHOW_LIMIT = 200
REFRESH_SECONDS = 5
#: Pages allow our own files only (no inline script, no other host).
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def templates() -> Jinja2Templates:
    env = Jinja2Templates(directory=str(HERE / "templates"))
    env.env.filters["ts"] = views.short_time
    env.env.globals.update(
        top_findings=views.top_findings, levels=PRIORITY_LEVELS, statuses=STUDY_STATUSES
    )
    return env


def _filters(request: Request) -> dict[str, str]:
    q = request.query_params
    status = q.get("status", "")
    level = q.get("level", "")
    since = q.get("since", "")
    return {
        "status": status if status in STUDY_STATUSES else "",
        "level": level if level in PRIORITY_LEVELS else "",
        "since": since if since in views.SINCE_CHOICES else "",
    }


def _page(tpl: Jinja2Templates, request: Request, name: str, context: dict[str, Any]) -> Response:
    response = tpl.TemplateResponse(request, name, context)
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def _not_found(tpl: Jinja2Templates, request: Request, what: str, status: int = 404) -> Response:
    response = tpl.TemplateResponse(
        request, "error.html", {"message": what, "status": status}, status_code=status
    )
    response.headers["Content-Security-Policy"] = PAGE_CSP
    return response


def _png(data: bytes) -> Response:
    return Response(
        data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


def pages_router(
    settings: NodeSettings, worklist: Worklist, aging: Any, reference: Mapping[str, Any]
) -> APIRouter:
    """Every page route (not in the OpenAPI document: it describes the JSON API).

    ``reference``: per finding, the spec's score-drift reference
    (:func:`dicom_node.web.operations.drift_reference`).
    """
    router = APIRouter(include_in_schema=False)
    tpl = templates()

    @router.get("/operations", response_class=HTMLResponse)
    def operations_page(request: Request) -> Response:
        from dicom_node.web.accuracy import page_context
        from dicom_node.web.operations import summary

        context = {"o": summary(worklist, reference), **page_context(worklist, settings.model)}
        return _page(tpl, request, "operations.html", context)

    def worklist_context(request: Request) -> dict[str, Any]:
        flt = _filters(request)
        now = views.now()
        rows = worklist.queries.list_worklist(
            status=flt["status"] or None,
            min_priority=flt["level"] or None,
            limit=FETCH_LIMIT,
            aging=aging,
        )
        rows = views.within(rows, flt["since"] or None, now)[:SHOW_LIMIT]
        deliveries = worklist.queries.delivery_states([r["study_uid"] for r in rows])
        views.add_thresholds(worklist, rows)
        for row in rows:
            row["waiting"], row["waiting_class"] = views.waiting(row, now)
            row["deliveries"] = deliveries.get(row["study_uid"], [])
        return {
            "rows": rows,
            "filters": flt,
            "counts": worklist.queries.counts_by_status(),
            "since_choices": list(views.SINCE_CHOICES),
            "refresh": REFRESH_SECONDS,
            "destinations": [str(d) for d in settings.destinations],
            "viewer": is_installed(settings.storage),
        }

    @router.get("/", response_class=HTMLResponse)
    def worklist_page(request: Request) -> Response:
        return _page(tpl, request, "worklist.html", worklist_context(request))

    @router.get("/partials/worklist", response_class=HTMLResponse)
    def worklist_rows(request: Request) -> Response:
        return _page(tpl, request, "worklist_rows.html", worklist_context(request))

    @router.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str) -> Response:
        if not is_valid_uid(study_uid):
            return _not_found(tpl, request, "not a valid Study Instance UID", 422)
        detail = worklist.queries.study_detail(study_uid, aging=aging)
        if detail is None:
            return _not_found(tpl, request, f"study {study_uid} is not in the worklist")
        try:
            _, cam_source = images.find_sc(settings.outbox_dir, study_uid)
            has_sc = True
        except images.ImageNotFound:
            cam_source, has_sc = "", False
        by_sop = {img["sop_uid"]: img for img in detail["images"]}
        source = by_sop.get(cam_source)
        if source is None and detail["findings"]:
            top = max(detail["findings"].values(), key=lambda f: f["probability"])
            source = by_sop.get(top.get("source_uid", ""))
        if source is None:
            source = next((i for i in detail["images"] if i.get("eligible")), None)
        now = views.now()
        detail["waiting"], detail["waiting_class"] = views.waiting(detail, now)
        return _page(
            tpl,
            request,
            "study.html",
            {
                "s": detail,
                "has_sc": has_sc,
                "source": source,
                "findings": sorted(
                    detail["findings"].items(), key=lambda kv: -kv[1]["probability"]
                ),
                "timings": sorted(detail["timings"].items()),
                "delivery_states": worklist.queries.delivery_states([study_uid]).get(study_uid, []),
                "viewer": is_installed(settings.storage),
                **feedback.page_context(worklist, study_uid, request),
            },
        )

    @router.get("/studies/{study_uid}/overlay.png")
    def overlay_png(request: Request, study_uid: str) -> Response:
        try:
            path, _ = images.find_sc(settings.outbox_dir, study_uid)
            return _png(images.render(path, "sc"))
        except images.ImageNotFound as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")

    @router.get("/studies/{study_uid}/images/{series_uid}/{sop_uid}.png")
    def source_png(request: Request, study_uid: str, series_uid: str, sop_uid: str) -> Response:
        try:
            path = images.spool_file(settings.spool_dir, study_uid, series_uid, sop_uid)
            return _png(images.render(path, "source"))
        except images.ImageNotFound as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        except Exception as exc:  # noqa: BLE001 - a file we cannot decode is a 422, not a 500
            logger.warning("cannot render %s for display: %s", sop_uid, type(exc).__name__)
            return Response("image cannot be decoded", status_code=422, media_type="text/plain")

    @router.get("/model/card", response_class=HTMLResponse)
    def model_card(request: Request) -> Response:
        text, where = "", ""
        try:
            from triage_core.models import default_checkpoint_path, model_card_path

            checkpoint = settings.model or default_checkpoint_path()
            card = model_card_path(checkpoint)
            if card is not None:
                text, where = card.read_text(encoding="utf-8", errors="replace"), card.name
        except Exception as exc:  # noqa: BLE001 - no card is a page saying so
            logger.warning("model card unavailable: %s", exc)
        return _page(tpl, request, "model_card.html", {"card": text, "where": where})

    return router
