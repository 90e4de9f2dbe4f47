"""Who may read the HTTP server: loopback only, an access token, or an authenticating proxy.

:func:`check_access` is an ASGI middleware installed on the whole application, pages and JSON
API alike (``/healthz`` included: a liveness probe on a non-loopback address carries the token
too). The rules, decided by the settings (validated in :mod:`dicom_node.settings`):

- ``http_token`` set: a request needs ``Authorization: Bearer <token>`` or the ``triage_token``
  cookie. A browser gets the cookie by opening any page once with ``?token=<token>``: the answer
  sets it (HttpOnly, SameSite=Strict, Secure under TLS) and redirects to the same URL without
  the token, so it does not stay in the address bar or the history. Comparisons are
  constant-time (:func:`hmac.compare_digest`).
- ``http_proxy_header`` set: a request needs that header (the proxy that authenticated the
  user sets it; the port must be reachable by the proxy only).
- neither: the server is bound to a loopback address (the settings refuse anything else).

Starlette has no token middleware of this shape (its ``AuthenticationMiddleware`` needs a
backend class and still leaves the 401 to every route), hence these few lines.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

COOKIE = "triage_token"


def _same(given: str, expected: bytes) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


class AccessGuard:
    """The request check of one server (``token`` and ``proxy_header`` from the settings)."""

    def __init__(self, token: str | None, proxy_header: str | None, secure: bool) -> None:
        self.token = token.encode("utf-8") if token else None
        self.proxy_header = proxy_header.lower() if proxy_header else None
        self.secure = secure

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.proxy_header is not None

    def allowed(self, request: Request) -> bool:
        if self.proxy_header is not None and request.headers.get(self.proxy_header):
            return True
        if self.token is None:
            return False
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and _same(value.strip(), self.token):
            return True
        cookie = request.cookies.get(COOKIE)
        return cookie is not None and _same(cookie, self.token)

    def token_login(self, request: Request) -> Response | None:
        """``?token=`` with the right token: set the cookie, redirect without the token."""
        given = request.query_params.get("token")
        if self.token is None or given is None or request.method != "GET":
            return None
        if not _same(given, self.token):
            return None
        rest = [(k, v) for k, v in parse_qsl(request.url.query) if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            self.token.decode("utf-8"),
            httponly=True,
            samesite="strict",
            secure=self.secure,
            path="/",
        )
        return response

    async def __call__(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if not self.enabled:
            return await call_next(request)
        login = self.token_login(request)
        if login is not None:
            return login
        if self.allowed(request):
            return await call_next(request)
        return PlainTextResponse(
            "401 Unauthorized: this cxr-triage server needs its access token "
            "(Authorization: Bearer TOKEN, or open a page once with ?token=TOKEN)",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="cxr-triage"'},
        )
