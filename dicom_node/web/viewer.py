"""The OHIF viewer at ``/viewer/``, and CORS on ``/dicomweb`` for a viewer run elsewhere.

:class:`ViewerMount` is the ASGI application mounted at ``/viewer``. With a viewer installed
(``triage viewer install``, :mod:`dicom_node.web.viewer_install`) it serves its files with
their MIME types (``application/wasm`` for the codecs: browsers refuse to stream-compile
anything else), and ``index.html`` for any path without a file extension, so OHIF's router
opens ``/viewer/viewer?StudyInstanceUIDs=UID`` (history fallback). Without one, every path
under ``/viewer`` answers 404 with a page saying how to install it. The check is made per
request: a viewer installed while the node runs is served at once. The mount sits behind the
application's access check like every page, and its answers carry a Content-Security-Policy
that lets the viewer reach this origin only.

:class:`DicomwebCors` answers CORS for ``/dicomweb`` paths only, for the exact origins of the
``cors_allow_origins`` setting (validated there: never ``*``), with credentials; other paths and
other origins get no CORS header.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from dicom_node.web.pages import PAGE_CSP, templates
from dicom_node.web.viewer_install import (
    OHIF_PACKAGE,
    OHIF_VERSION,
    VIEWER_BASE,
    dist_dir,
    is_installed,
)

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

#: MIME types of the files the build ships, not left to the host's ``/etc/mime.types``.
MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
}
#: What the viewer may load: this origin only. OHIF needs inline scripts (``index.html``),
#: ``eval`` and WebAssembly for its codecs, and blob: workers.
VIEWER_CSP = (
    "default-src 'self'; "
    "script-src 'self' 'unsafe-inline' 'unsafe-eval' 'wasm-unsafe-eval' blob:; "
    "worker-src 'self' blob:; connect-src 'self' blob: data:; img-src 'self' data: blob:; "
    "style-src 'self' 'unsafe-inline'; font-src 'self' data:; media-src 'self' blob:; "
    "object-src 'none'; frame-ancestors 'self'; base-uri 'self'; form-action 'self'"
)
CORS_PREFIX = "/dicomweb"
CORS_METHODS = ("GET", "HEAD", "POST")
CORS_HEADERS = ("Authorization", "Accept", "Content-Type")


def install_hint(storage: Path) -> str:
    """The command that installs the viewer for the node of ``storage``."""
    return f"triage viewer install --storage {Path(storage).resolve()}"


def viewer_url(study_uid: str) -> str:
    """The viewer's address of one study (a validated UID: digits and dots only)."""
    return f"{VIEWER_BASE}/viewer?StudyInstanceUIDs={study_uid}"


class _ViewerFiles(StaticFiles):
    """The build's files with our MIME types; ``index.html`` for extension-less paths."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            last = path.rsplit("/", 1)[-1]
            if exc.status_code != 404 or "." in last:
                raise
        return await super().get_response("index.html", scope)

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        kind = MIME_TYPES.get(Path(full_path).suffix.lower())
        if kind is not None and isinstance(response, FileResponse):
            response.media_type = kind
            response.headers["content-type"] = kind
        return response


class ViewerMount:
    """The ASGI application at ``/viewer`` (see the module docstring)."""

    def __init__(self, storage: Path) -> None:
        self.storage = Path(storage)
        self._files = _ViewerFiles(directory=dist_dir(self.storage), html=True, check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if not is_installed(self.storage):
            await self._not_installed(scope, receive, send)
            return

        async def with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += [
                    (b"content-security-policy", VIEWER_CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"private, no-cache"),
                ]
            await send(message)

        try:
            await self._files(scope, receive, with_headers)
        except HTTPException as exc:
            await Response(str(exc.detail), exc.status_code, media_type="text/plain")(
                scope, receive, send
            )

    async def _not_installed(self, scope: Scope, receive: Receive, send: Send) -> None:
        hint = install_hint(self.storage)
        body = (
            templates()
            .get_template("viewer_missing.html")
            .render(hint=hint, package=f"{OHIF_PACKAGE}@{OHIF_VERSION}")
        )
        response = HTMLResponse(body, status_code=404)
        response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers["Cache-Control"] = "no-store"
        await response(scope, receive, send)


class DicomwebCors:
    """CORS for ``/dicomweb`` paths and the exact ``origins`` (with credentials)."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        if "*" in origins:
            raise ValueError("CORS with credentials cannot allow every origin ('*')")
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=list(CORS_METHODS),
            allow_headers=list(CORS_HEADERS),
            allow_credentials=True,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == CORS_PREFIX or path.startswith(CORS_PREFIX + "/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
