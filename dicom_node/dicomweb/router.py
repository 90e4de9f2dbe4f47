"""The DICOMweb root ``/dicomweb`` of the node's HTTP server: STOW-RS, QIDO-RS, WADO-RS.

:func:`dicomweb_router` gives the routes; the work is in :mod:`~dicom_node.dicomweb.stow`
(store), :mod:`~dicom_node.dicomweb.qido` (search) and :mod:`~dicom_node.dicomweb.wado`
(retrieve), over :mod:`~dicom_node.dicomweb.catalog`. Access is the HTTP server's
(:mod:`dicom_node.web.access`: loopback only, or the token, or the authenticating proxy;
storing needs the role ``reader`` or ``admin``, which that guard checks before a route runs); the
calling-AE allow-list has no counterpart here (HTTP carries no AE title). Every UID in a path
is checked against the DICOM UID grammar first (400 otherwise); a resource we do not hold is
404; a body or an ``Accept`` we cannot serve is 415 or 406, with a one-line ``detail``.

=========================================================  ======================================
route                                                      service
=========================================================  ======================================
``POST /studies``, ``POST /studies/{study}``               STOW-RS (multipart/related DICOM)
``GET /studies``, ``/series``, ``/instances``              QIDO-RS at the root
``GET /studies/{study}/series``, ``/studies/{study}/       QIDO-RS in a study or a series
instances``, ``/studies/{study}/series/{series}/
instances``
``GET /studies/{study}[/series/{series}[/instances/        WADO-RS instances
{sop}]]``
``GET .../metadata`` (each of those three levels)          WADO-RS metadata (dicom+json)
``GET .../instances/{sop}/bulkdata/{tag}[/{item}/{tag}]``  WADO-RS bulk data (octet-stream)
``GET .../instances/{sop}/frames/{list}``                  WADO-RS frames (:mod:`.frames`)
``GET .../instances/{sop}/rendered``, ``.../frames/{n}/    WADO-RS rendered (JPEG or PNG)
rendered``
``GET .../thumbnail`` (study, series, instance)            WADO-RS thumbnail (JPEG or PNG)
=========================================================  ======================================
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_node.dicomweb import qido, wado
from dicom_node.dicomweb.catalog import (
    BulkPathError,
    Catalog,
    Entry,
    dataset_json,
    parse_bulk_path,
    read_header,
)
from dicom_node.dicomweb.multipart import (
    MediaTypeError,
    parse_accept,
    parse_media_type,
    related_boundary,
)
from dicom_node.dicomweb.pixels import add_pixel_routes
from dicom_node.dicomweb.stow import PartOutcome, StowBodyError, StowRequest, store_response
from triage_core.uids import is_valid_uid

if TYPE_CHECKING:
    from dicom_node.ingest.spool import StoreContext
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

ROOT = "/dicomweb"
DICOM_JSON = "application/dicom+json"
#: Body bytes gathered before one hop to a worker thread (file writes, fsync, commit).
FEED_CHUNK = 1 << 20


def problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(content=content, status_code=status, media_type=DICOM_JSON, headers=headers)


def _base(request: Request) -> str:
    """The DICOMweb root as the client reached it (the ``Host`` header). A ``Host`` without a
    port while the server listens on a non-default one (``dicomweb-client`` sends its host
    alone) gets the server's port, so the Retrieve URLs and BulkDataURIs we answer work."""
    url = request.base_url
    server = request.scope.get("server")
    default = 443 if url.scheme == "https" else 80
    if url.port is None and server and server[1] not in (None, default):
        url = url.replace(port=int(server[1]))
    return str(url).rstrip("/") + ROOT


def instance_url(base: str, entry: Entry) -> str:
    return f"{base}/studies/{entry.study_uid}/series/{entry.series_uid}/instances/{entry.sop_uid}"


def _check_uids(*uids: str | None) -> JSONResponse | None:
    for uid in uids:
        if uid is not None and not is_valid_uid(uid):
            return problem(400, f"{uid[:80]!r} is not a valid DICOM UID")
    return None


def _wants_json(request: Request) -> bool:
    try:
        accept = parse_accept(request.headers.get("accept"))
    except MediaTypeError:
        return False
    return not accept or any(
        m.type in (DICOM_JSON, "application/json", "*/*", "application/*") for m in accept
    )


def _peer(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


async def _chunks(request: Request, timeout: float) -> AsyncIterator[list[bytes]]:
    """The body as lists of the server's chunks, about :data:`FEED_CHUNK` bytes a list (kept
    as received: never joined, so never copied); a silence over ``timeout`` ends it."""
    stream = request.stream().__aiter__()
    pending: list[bytes] = []
    size = 0
    while True:
        with anyio.fail_after(timeout):
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
        pending.append(chunk)
        size += len(chunk)
        if size >= FEED_CHUNK:
            yield pending
            pending, size = [], 0
    if pending:
        yield pending


def _feed(job: StowRequest, pieces: list[bytes]) -> None:
    for piece in pieces:
        job.feed(piece)


def _feed_and_close(job: StowRequest, pieces: list[bytes]) -> list[PartOutcome]:
    """The last pieces and the end of the body in one thread hop (a one-instance request makes
    a single hop)."""
    _feed(job, pieces)
    return job.close()


def dicomweb_router(
    settings: NodeSettings,
    worklist: Worklist,
    store: Callable[[], StoreContext | None],
) -> APIRouter:
    """The DICOMweb routes (see the module docstring); ``store`` gives the receive path once
    the receiver has started (STOW-RS answers 503 before)."""
    router = APIRouter(prefix=ROOT, tags=["DICOMweb"])
    catalog = Catalog(worklist, settings.storage)

    def base_of(request: Request) -> str:
        """The root our URLs start with: ``dicomweb_base_url`` (behind a reverse proxy), else
        as the client reached us."""
        return settings.dicomweb_base_url or _base(request)

    # ------------------------------------------------------------------ STOW-RS
    async def stow(request: Request, study: str | None) -> Response:
        if (bad := _check_uids(study)) is not None:
            return bad
        context = store()
        if context is None:
            return problem(503, "the receiver is not running")
        if not _wants_json(request):
            return problem(406, f"the Store Instances Response is given as {DICOM_JSON}")
        try:
            media = parse_media_type(request.headers.get("content-type", ""))
            if media.type != "multipart/related":
                raise MediaTypeError(f"{media.type or 'no content type'}")
            part_type = media.param("type", "application/dicom").lower()
            if part_type != "application/dicom":
                raise MediaTypeError(f'multipart/related; type="{part_type}"')
            boundary = related_boundary(media)
        except MediaTypeError as exc:
            return problem(
                415, f'STOW-RS takes multipart/related; type="application/dicom" ({exc})'
            )
        length = request.headers.get("content-length")
        if length is not None and (
            not length.isdigit() or int(length) > settings.dicomweb_max_body
        ):
            return problem(
                413, f"request body over dicomweb_max_body ({settings.dicomweb_max_body})"
            )
        peer = _peer(request)
        try:
            job = StowRequest(
                context,
                boundary,
                study_uid=study or "",
                max_body=settings.dicomweb_max_body,
                max_part=settings.dicomweb_max_part,
                max_parts=settings.dicomweb_max_parts,
                peer=peer,
            )
        except StowBodyError as exc:
            return problem(exc.status, str(exc))
        try:
            held: list[bytes] = []  # fed with the end of the body, in the same hop
            async for pieces in _chunks(request, settings.network_timeout):
                if held:
                    await run_in_threadpool(_feed, job, held)
                held = pieces
            outcomes = await run_in_threadpool(_feed_and_close, job, held)
        except StowBodyError as exc:
            logger.warning("STOW-RS from %s refused (%d): %s", peer, exc.status, exc)
            stored = sum(1 for o in job.outcomes if not o.failure)
            return problem(exc.status, f"{exc} ({stored} instance(s) before it were stored)")
        except (ClientDisconnect, TimeoutError) as exc:
            await run_in_threadpool(job.abort, "client gone or silent")
            logger.warning("STOW-RS from %s ended early: %s", peer, type(exc).__name__)
            return problem(400, "the request body ended early")
        except BaseException:
            await run_in_threadpool(job.abort, "server error")
            raise
        status, body = store_response(outcomes, base_of(request))
        logger.info(
            "STOW-RS from %s: %d stored, %d failed",
            peer,
            sum(1 for o in outcomes if not o.failure),
            sum(1 for o in outcomes if o.failure),
        )
        return _json(body, status)

    @router.post("/studies", summary="STOW-RS: store instances")
    async def stow_studies(request: Request) -> Response:
        return await stow(request, None)

    @router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
    async def stow_study(request: Request, study: str) -> Response:
        return await stow(request, study)

    # ------------------------------------------------------------------ QIDO-RS
    def search(
        request: Request, level: qido.Level, study: str | None = None, series: str | None = None
    ) -> Response:
        if (bad := _check_uids(study, series)) is not None:
            return bad
        if not _wants_json(request):
            return problem(406, f"QIDO-RS answers {DICOM_JSON}")
        try:
            query = qido.parse_query(request.query_params.multi_items())
        except qido.QueryError as exc:
            return problem(400, str(exc))
        entries = catalog.entries(study, series)
        results, more = qido.search(entries, level, query, base_of(request))
        headers = {}
        if more:
            headers["Warning"] = (
                '299 cxr-triage: "The number of results exceeded the maximum supported by the '
                'server. Additional results can be requested."'
            )
        return _json(results, headers=headers)

    @router.get("/studies", summary="QIDO-RS: search studies")
    def search_studies(request: Request) -> Response:
        return search(request, qido.Level(qido.STUDY, False, False))

    @router.get("/series", summary="QIDO-RS: search series")
    def search_all_series(request: Request) -> Response:
        return search(request, qido.Level(qido.SERIES, True, False))

    @router.get("/instances", summary="QIDO-RS: search instances")
    def search_all_instances(request: Request) -> Response:
        return search(request, qido.Level(qido.INSTANCE, True, True))

    @router.get("/studies/{study}/series", summary="QIDO-RS: search a study's series")
    def search_series(request: Request, study: str) -> Response:
        return search(request, qido.Level(qido.SERIES, False, False), study)

    @router.get("/studies/{study}/instances", summary="QIDO-RS: search a study's instances")
    def search_study_instances(request: Request, study: str) -> Response:
        return search(request, qido.Level(qido.INSTANCE, False, True), study)

    @router.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search a series")
    def search_instances(request: Request, study: str, series: str) -> Response:
        return search(request, qido.Level(qido.INSTANCE, False, False), study, series)

    # ------------------------------------------------------------------ WADO-RS
    def entries_or_404(
        study: str, series: str | None = None, sop: str | None = None
    ) -> list[Entry] | Response:
        if (bad := _check_uids(study, series, sop)) is not None:
            return bad
        found = catalog.entries(study, series, sop)
        if not found:
            return problem(404, "no such study, series or instance")
        return found

    def retrieve(request: Request, study: str, series: str | None, sop: str | None) -> Response:
        found = entries_or_404(study, series, sop)
        if isinstance(found, Response):
            return found
        try:
            syntax, single = wado.negotiate(parse_accept(request.headers.get("accept")), found)
        except (MediaTypeError, wado.NotAcceptable) as exc:
            return problem(406, str(exc))
        if single:
            if sop is None:
                return problem(406, "application/dicom (one part) is given for one instance only")
            data = wado.transcoded(found[0].path, syntax) if syntax else None
            if data is None:
                data = found[0].path.read_bytes()
            return Response(content=data, media_type="application/dicom")
        content_type, chunks = wado.instance_parts(found, syntax, base_of(request))
        return StreamingResponse(iterate_in_threadpool(chunks), media_type=content_type)

    def metadata(study: str, series: str | None, sop: str | None, request: Request) -> Response:
        found = entries_or_404(study, series, sop)
        if isinstance(found, Response):
            return found
        if not _wants_json(request):
            return problem(406, f"metadata is given as {DICOM_JSON}")
        base = base_of(request)
        out = []
        for entry in found:
            header = read_header(entry.path)
            if header is None:
                continue
            url = instance_url(base, entry)
            out.append(dataset_json(header, url, with_pixels=True))
        return _json(out)

    @router.get("/studies/{study}", summary="WADO-RS: a study's instances")
    def get_study(request: Request, study: str) -> Response:
        return retrieve(request, study, None, None)

    @router.get("/studies/{study}/metadata", summary="WADO-RS: a study's metadata")
    def get_study_metadata(request: Request, study: str) -> Response:
        return metadata(study, None, None, request)

    @router.get("/studies/{study}/series/{series}", summary="WADO-RS: a series' instances")
    def get_series(request: Request, study: str, series: str) -> Response:
        return retrieve(request, study, series, None)

    @router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: series metadata")
    def get_series_metadata(request: Request, study: str, series: str) -> Response:
        return metadata(study, series, None, request)

    @router.get("/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: instance")
    def get_instance(request: Request, study: str, series: str, sop: str) -> Response:
        return retrieve(request, study, series, sop)

    @router.get(
        "/studies/{study}/series/{series}/instances/{sop}/metadata",
        summary="WADO-RS: instance metadata",
    )
    def get_instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
        return metadata(study, series, sop, request)

    @router.get(
        "/studies/{study}/series/{series}/instances/{sop}/bulkdata/{bulk_path:path}",
        summary="WADO-RS: bulk data of an element (TAG, or TAG/ITEM/TAG in a sequence)",
    )
    def get_bulkdata(study: str, series: str, sop: str, bulk_path: str) -> Response:
        found = entries_or_404(study, series, sop)
        if isinstance(found, Response):
            return found
        try:
            path = parse_bulk_path(bulk_path)
        except BulkPathError as exc:
            return problem(400, str(exc))
        data = wado.bulk_value(found[0].path, path)
        if data is None:
            return problem(404, f"no bulk data element {bulk_path[:80].upper()} in this instance")
        content_type, chunks = wado.bulk_parts(data)
        return StreamingResponse(iterate_in_threadpool(chunks), media_type=content_type)

    add_pixel_routes(router, entries_or_404)
    return router
