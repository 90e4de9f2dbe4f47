"""The node's HTTP server: the application assembled, TLS, and uvicorn in a thread.

:class:`HttpApi` is the component ``triage serve`` runs: the JSON API of
:mod:`dicom_node.web.api`, the pages, ``/docs`` and the access check (:func:`install`) and the
DICOMweb routes of :mod:`dicom_node.dicomweb`, under one uvicorn server.

:func:`install` adds to the JSON API application:

- the pages of :mod:`dicom_node.web.pages` (worklist at ``/``, a study at ``/studies/{uid}``,
  operations at ``/operations``, the model card) and their own CSS and JavaScript under
  ``/static/``;
- ``/docs``: Swagger UI 5 from the files the ``swagger-ui-py`` package ships, under
  ``/static/swagger/`` (FastAPI's own ``/docs`` and ``/redoc`` load them from a CDN, which a
  hospital network or an offline machine cannot reach; ``swagger-ui-bundle`` ships Swagger UI
  4, which cannot read the OpenAPI 3.1 document FastAPI writes);
- the OHIF viewer at ``/viewer/`` (:mod:`dicom_node.web.viewer`: the installed build, or a page
  saying how to install it);
- the access check of :mod:`dicom_node.web.access` on every route, and outside it CORS for
  ``/dicomweb`` when ``cors_allow_origins`` names origins.

:func:`uvicorn_options` gives the TLS options of the server from the ``http_tls_*`` settings.
Nothing is imported at module import beyond the standard library.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dicom_node.ingest.spool import StoreContext
    from dicom_node.metrics import Metrics
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

#: FastAPI's CDN-backed documentation routes, replaced by ours.
_CDN_ROUTES = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
)


def _add_docs(app: FastAPI) -> None:
    from pathlib import Path

    import swagger_ui
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.router.routes[:] = [
        r for r in app.router.routes if getattr(r, "path", None) not in _CDN_ROUTES
    ]
    app.mount(
        "/static/swagger",
        StaticFiles(directory=str(Path(swagger_ui.__file__).resolve().parent / "static")),
        name="swagger",
    )

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def install(
    app: FastAPI,
    settings: NodeSettings,
    worklist: Worklist,
    aging: Any = None,
    metrics: Metrics | None = None,
) -> None:
    """Add the pages, static files, offline ``/docs`` and the access check to ``app``.

    ``aging`` is the rule the pages order by (default: ``triage_core.priority.AgingRule()``,
    the JSON API's default). With ``metrics`` the score-drift gauges of
    :mod:`dicom_node.web.operations` join its registry.
    """
    from fastapi.staticfiles import StaticFiles

    from dicom_node.web.access import AccessGuard, AccessMiddleware
    from dicom_node.web.operations import DriftCollector, drift_reference
    from dicom_node.web.pages import HERE, pages_router
    from dicom_node.web.viewer import ViewerMount

    if aging is None:
        from triage_core.priority import AgingRule

        aging = AgingRule()
    _add_docs(app)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.mount("/viewer", ViewerMount(settings.storage), name="viewer")
    reference = drift_reference(settings.model)
    app.include_router(pages_router(settings, worklist, aging, reference))
    if metrics is not None:
        metrics.registry.register(DriftCollector(worklist, reference))  # type: ignore[arg-type]
        from dicom_node.web.accuracy import AccuracyCollector

        metrics.registry.register(AccuracyCollector(worklist, settings.model))  # type: ignore[arg-type]
    token = settings.http_token.get_secret_value() if settings.http_token else None
    guard = AccessGuard(
        token, settings.http_proxy_header, settings.http_tls_cert is not None, worklist.tokens
    )
    app.add_middleware(AccessMiddleware, guard=guard)
    if settings.cors_allow_origins:  # outside the guard: a preflight carries no credentials
        from dicom_node.web.viewer import DicomwebCors

        app.add_middleware(DicomwebCors, origins=list(settings.cors_allow_origins))


def uvicorn_options(settings: NodeSettings) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for HTTPS (empty without ``http_tls_cert``)."""
    if settings.http_tls_cert is None:
        return {}
    import ssl

    options: dict[str, Any] = {
        "ssl_certfile": str(settings.http_tls_cert),
        "ssl_keyfile": str(settings.http_tls_key),
    }
    if settings.http_tls_ca is not None:
        options["ssl_ca_certs"] = str(settings.http_tls_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def base_url(settings: NodeSettings) -> str:
    """``http(s)://host:port`` of the pages, for the start banner."""
    scheme = "https" if settings.http_tls_cert is not None else "http"
    host = settings.http_host
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.http_port}"


class HttpApi:
    """The component that serves :func:`create_app`, the pages (:func:`install`)
    and DICOMweb (:mod:`dicom_node.dicomweb.router`; STOW-RS through ``store``, the receiver's
    receive path) with uvicorn in a thread (``http_port`` 0 disables it)."""

    def __init__(
        self,
        settings: NodeSettings,
        worklist: Worklist,
        metrics: Metrics,
        store: Callable[[], StoreContext | None] | None = None,
        readiness: Callable[[], str] | None = None,
    ) -> None:
        self.settings = settings
        self.worklist = worklist
        self.metrics = metrics
        self.store = store  # the receive path, for STOW-RS
        self.readiness = readiness
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        settings = self.settings
        if not settings.http_port:
            logger.info("HTTP API disabled (http_port = 0)")
            return
        import uvicorn

        from dicom_node.dicomweb.router import dicomweb_router
        from dicom_node.web.api import create_app

        app = create_app(self.worklist, self.metrics, readiness=self.readiness)
        install(app, settings, self.worklist, metrics=self.metrics)  # pages, /docs, access
        # DICOMweb (STOW-RS, QIDO-RS, WADO-RS) under the same access check
        app.include_router(dicomweb_router(settings, self.worklist, self.store or (lambda: None)))
        config = uvicorn.Config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            **uvicorn_options(settings),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http-api", daemon=True)
        self._thread.start()
        logger.info("HTTP pages and API on %s/", base_url(settings))

    def stop(self, deadline: float) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server = None
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
