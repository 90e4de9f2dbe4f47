"""The WADO-RS routes that viewers draw from: frames, rendered images, thumbnails.

=============================================================  ================================
route (under ``/dicomweb/studies/{study}/series/{series}``)    answer
=============================================================  ================================
``.../instances/{sop}/frames/{list}``                          frames (:mod:`.frames`)
``.../instances/{sop}/frames/{n}/rendered``                    one frame rendered
``.../instances/{sop}/rendered``                               the first frame rendered
``/rendered`` (series),                                        each instance's first frame
``/dicomweb/studies/{study}/rendered``                         rendered, one part each
``.../instances/{sop}/thumbnail``, ``/thumbnail`` (series),    a thumbnail (:mod:`.rendering`)
``/dicomweb/studies/{study}/thumbnail``
=============================================================  ================================

A series' or a study's thumbnail is that of a representative instance: the first with Pixel
Data by Instance Number, received images before our results (so a study shows its radiograph,
not our heatmap). Rendering and frame reading are blocking work; the routes are plain ``def``
(FastAPI runs them in its thread pool) and frame bodies are streamed from a thread.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from dicom_node.dicomweb import frames, rendering
from dicom_node.dicomweb.catalog import Entry, read_header
from dicom_node.dicomweb.multipart import (
    MediaTypeError,
    multipart_chunks,
    new_boundary,
    parse_accept,
    related_content_type,
)

logger = logging.getLogger(__name__)

#: Finds the entries of a study, series or instance, or answers 400/404 (the router's).
Finder = Callable[[str, str | None, str | None], "list[Entry] | Response"]


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def representative(entries: list[Entry]) -> Entry | None:
    """The instance whose image stands for ``entries`` (see the module docstring)."""
    best: tuple[bool, int, int] | None = None
    chosen = None
    for order, entry in enumerate(entries):
        header = read_header(entry.path)
        if header is None or "Rows" not in header:
            continue
        try:
            number = int(header.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        key = (entry.result, number, order)
        if best is None or key < best:
            best, chosen = key, entry
    return chosen


def add_pixel_routes(router: APIRouter, find: Finder) -> None:
    """Add the routes of the module docstring to ``router`` (prefix ``/dicomweb``)."""

    def draw(request: Request, entry: Entry, index: int, thumbnail: bool) -> Response:
        try:
            accept = parse_accept(request.headers.get("accept"))
            wanted = rendering.parse_request(accept, request.query_params)
            _, multipart = rendering.media_type_of(accept, request.query_params.get("accept"))
            data = rendering.render(entry.path, wanted, index, thumbnail)
        except MediaTypeError as exc:
            return _problem(406, str(exc))
        except rendering.RenderError as exc:
            return _problem(exc.status, str(exc))
        except FileNotFoundError:
            return _problem(404, "the instance is no longer stored")
        except Exception as exc:  # noqa: BLE001 - an undecodable image is a 406, logged
            logger.warning("instance %s cannot be rendered: %s", entry.sop_uid, exc)
            return _problem(406, "this instance cannot be rendered as an image")
        if multipart:  # one part, as the client's multipart Accept asked
            boundary = new_boundary()
            body = b"".join(multipart_chunks([(wanted.media_type, data, "")], boundary))
            return Response(body, media_type=related_content_type(boundary, wanted.media_type))
        return Response(content=data, media_type=wanted.media_type)

    def thumbnail(request: Request, study: str, series: str | None, sop: str | None) -> Response:
        found = find(study, series, sop)
        if isinstance(found, Response):
            return found
        entry = representative(found)
        if entry is None:
            return _problem(404, "no instance here has an image to make a thumbnail of")
        return draw(request, entry, 0, thumbnail=True)

    def rendered_all(request: Request, study: str, series: str | None) -> Response:
        """Every instance with pixels of a study or series, its first frame rendered, one part
        each (streamed: one image at a time)."""
        found = find(study, series, None)
        if isinstance(found, Response):
            return found
        try:
            accept = parse_accept(request.headers.get("accept"))
            wanted = rendering.parse_request(accept, request.query_params)
        except MediaTypeError as exc:
            return _problem(406, str(exc))
        except rendering.RenderError as exc:
            return _problem(exc.status, str(exc))
        images = [e for e in found if (h := read_header(e.path)) is not None and "Rows" in h]
        if not images:
            return _problem(404, "no instance here has an image to render")

        def parts() -> Iterator[tuple[str, bytes, str]]:
            for entry in images:
                try:
                    data = rendering.render(entry.path, wanted)
                except Exception as exc:  # noqa: BLE001 - one bad image leaves its part out
                    logger.warning("instance %s cannot be rendered: %s", entry.sop_uid, exc)
                    continue
                yield wanted.media_type, data, ""

        boundary = new_boundary()
        return StreamingResponse(
            iterate_in_threadpool(multipart_chunks(parts(), boundary)),
            media_type=related_content_type(boundary, wanted.media_type),
        )

    @router.get("/studies/{study}/rendered", summary="WADO-RS: a study's images rendered")
    def study_rendered(request: Request, study: str) -> Response:
        return rendered_all(request, study, None)

    @router.get(
        "/studies/{study}/series/{series}/rendered", summary="WADO-RS: a series' images rendered"
    )
    def series_rendered(request: Request, study: str, series: str) -> Response:
        return rendered_all(request, study, series)

    @router.get("/studies/{study}/thumbnail", summary="WADO-RS: a study's thumbnail")
    def study_thumbnail(request: Request, study: str) -> Response:
        return thumbnail(request, study, None, None)

    @router.get(
        "/studies/{study}/series/{series}/thumbnail", summary="WADO-RS: a series' thumbnail"
    )
    def series_thumbnail(request: Request, study: str, series: str) -> Response:
        return thumbnail(request, study, series, None)

    @router.get(
        "/studies/{study}/series/{series}/instances/{sop}/thumbnail",
        summary="WADO-RS: an instance's thumbnail",
    )
    def instance_thumbnail(request: Request, study: str, series: str, sop: str) -> Response:
        return thumbnail(request, study, series, sop)

    @router.get(
        "/studies/{study}/series/{series}/instances/{sop}/rendered",
        summary="WADO-RS: the instance (its first frame) rendered as JPEG or PNG",
    )
    def instance_rendered(request: Request, study: str, series: str, sop: str) -> Response:
        found = find(study, series, sop)
        if isinstance(found, Response):
            return found
        return draw(request, found[0], 0, thumbnail=False)

    @router.get(
        "/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}/rendered",
        summary="WADO-RS: one frame rendered as JPEG or PNG",
    )
    def frame_rendered(
        request: Request, study: str, series: str, sop: str, frame_list: str
    ) -> Response:
        found = find(study, series, sop)
        if isinstance(found, Response):
            return found
        header = read_header(found[0].path)
        count = int(header.get("NumberOfFrames", 1) or 1) if header is not None else 0
        try:
            indices = frames.parse_frame_list(frame_list, count)
        except frames.FrameRequestError as exc:
            return _problem(exc.status, str(exc))
        if len(indices) != 1:
            return _problem(400, "a rendered frame request names one frame")
        return draw(request, found[0], indices[0], thumbnail=False)

    @router.get(
        "/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}",
        summary="WADO-RS: frames (as stored or decoded to Explicit VR Little Endian)",
    )
    def get_frames(
        request: Request, study: str, series: str, sop: str, frame_list: str
    ) -> Response:
        found = find(study, series, sop)
        if isinstance(found, Response):
            return found
        source = frames.pixel_source(found[0].path)
        if source is None:
            return _problem(404, "this instance has no Pixel Data, so no frames")
        try:
            indices = frames.parse_frame_list(frame_list, source.number_of_frames)
        except frames.FrameRequestError as exc:
            return _problem(exc.status, str(exc))
        try:
            plan = frames.choose(parse_accept(request.headers.get("accept")), source)
        except (MediaTypeError, frames.NotAcceptable) as exc:
            return _problem(406, str(exc))
        content_type, chunks = frames.frames_response(source, indices, plan)
        try:  # the first part now: a frame we cannot read is an error answer, not a cut body
            first = next(chunks)
        except Exception as exc:  # noqa: BLE001 - logged, answered with its reason
            logger.warning("frames of %s cannot be read: %s", sop, exc)
            return _problem(406 if plan.decode else 500, "the frames cannot be read or decoded")
        body = itertools.chain([first], chunks)
        return StreamingResponse(iterate_in_threadpool(body), media_type=content_type)
