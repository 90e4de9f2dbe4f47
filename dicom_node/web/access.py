"""Who may read the HTTP server, and who is asking: loopback, access tokens, or a proxy.

:class:`AccessGuard` decides and :class:`AccessMiddleware` (plain ASGI) applies it to the whole
application: pages, JSON API, DICOMweb and WebSocket connections alike (``/healthz`` included: a
liveness probe on a non-loopback address carries a token too). Every request it lets through
carries a :class:`Principal` in ``request.state.principal`` (user name and role, ``viewer`` <
``reader`` < ``admin``); the routes that change something check the role (``POST
/api/studies/{uid}/feedback`` needs ``reader``). The rules:

- Tokens: the ``http_token`` setting (one shared token, the user ``admin`` with the role
  ``admin``, as before named tokens existed) and the named tokens of ``triage token add NAME
  --role ROLE`` (table ``api_tokens`` of the worklist; only their SHA-256 is stored). A request
  carries one as ``Authorization: Bearer <token>`` or in the ``triage_token`` cookie. A browser
  gets the cookie by opening any page once with ``?token=<token>``: the answer sets it
  (HttpOnly, SameSite=Strict, Secure under TLS; a cross-site form cannot post with it) and
  redirects to the same URL without the token, so it does not stay in the address bar or the
  history. ``http_token`` is compared in constant time (:func:`hmac.compare_digest`); a named
  token is hashed and its hash looked up. Lookups are cached for :data:`CACHE_SECONDS`, so a
  revoked token stops working within that time.
- ``http_proxy_header`` set: a request with that header is let in (the proxy that authenticated
  the user sets it; the port must be reachable by the proxy only); the user is the header's value
  and the role that of the named token of that user if there is one, else ``viewer``.
- Once ``http_token``, ``http_proxy_header`` or any named token exists, every request needs one
  of them. Before that (a server the settings keep on a loopback address) requests are let in as
  an anonymous ``viewer``: they can read, not give feedback.
- Storing (STOW-RS, any ``POST`` under ``/dicomweb``) needs the role ``reader`` or ``admin``
  (:func:`may_store`); a ``viewer`` token, or a proxy user without one of those roles, gets 403
  before a byte of the body is read. This guard checks it, by method and path, because the
  DICOMweb package sits below the web layer and never sees a principal. Why no dedicated role:
  the roles are one ladder (viewer < reader < admin) that ``triage token add --role`` and the
  tokens table know; a ``sender`` rung between viewer and reader would let a sending system
  store without judging, but is a change to both. Storing adds studies to the worklist and
  starts inference on them, a change to the node as a reader's verdict is, so it takes the same
  rung; a PACS or modality that stores by STOW-RS gets a ``reader`` token (it could then also
  post verdicts under its own name, which the feedback page shows as such). The anonymous
  loopback viewer (no token of any kind exists, the server is on a loopback address) may store:
  anyone on that host can C-STORE to the DICOM port just as well, so refusing STOW-RS would
  protect nothing and would break local tools.

Starlette has no token middleware of this shape (its ``AuthenticationMiddleware`` needs a
backend class and still leaves the 401 to every route), hence these lines.
"""

from __future__ import annotations

import hmac
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from triage_core.worklist.tokens import Tokens

COOKIE = "triage_token"
#: Seconds a token lookup (and "are there named tokens?") is reused.
CACHE_SECONDS = 5.0
#: The principal of the ``http_token`` setting.
SHARED_TOKEN_USER = "admin"
_ROLES = ("viewer", "reader", "admin")


def _same(given: str, expected: bytes) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


@dataclass(frozen=True)
class Principal:
    """Who a request is: ``name`` (empty for the anonymous loopback viewer) and ``role``."""

    name: str
    role: str

    def may(self, needed: str) -> bool:
        """Whether this role may do what ``needed`` may (roles: viewer < reader < admin)."""
        return _ROLES.index(self.role) >= _ROLES.index(needed)


ANONYMOUS = Principal("", "viewer")
#: The least role that may store (STOW-RS); see the module docstring.
STORE_ROLE = "reader"
#: Requests that store: a POST (or PUT) under the DICOMweb root.
_STORE_METHODS = frozenset({"POST", "PUT"})


def may_store(principal: Principal) -> bool:
    """Whether ``principal`` may store by STOW-RS: ``reader`` or ``admin``, or the anonymous
    loopback viewer (see the module docstring)."""
    return principal is ANONYMOUS or principal.may(STORE_ROLE)


def stores(request: HTTPConnection) -> bool:
    """Whether ``request`` is a store (STOW-RS) request."""
    from dicom_node.dicomweb.router import ROOT as root

    path = request.url.path
    method = request.scope.get("method", "")  # a WebSocket has none
    return method in _STORE_METHODS and (path == root or path.startswith(root + "/"))


def principal_of(request: HTTPConnection) -> Principal:
    """The request's principal (the anonymous viewer when no guard ran)."""
    found = getattr(request.state, "principal", None)
    return found if isinstance(found, Principal) else ANONYMOUS


class AccessGuard:
    """The request check of one server (``token`` and ``proxy_header`` from the settings,
    ``tokens`` the worklist's named tokens)."""

    def __init__(
        self,
        token: str | None,
        proxy_header: str | None,
        secure: bool,
        tokens: Tokens | None = None,
    ) -> None:
        self.token = token.encode("utf-8") if token else None
        self.proxy_header = proxy_header.lower() if proxy_header else None
        self.secure = secure
        self.tokens = tokens
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._named: tuple[float, bool] | None = None

    # ------------------------------------------------------------------ lookups (blocking)
    def _cached(self, key: str, find: Callable[[], Principal | None]) -> Principal | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < CACHE_SECONDS:
                return hit[1]
        found = find()
        with self._lock:
            if len(self._cache) > 10_000:  # wrong tokens must not grow it without bound
                self._cache.clear()
            self._cache[key] = (now, found)
        return found

    def _token_principal(self, given: str) -> Principal | None:
        if not given:
            return None
        if self.token is not None and _same(given, self.token):
            return Principal(SHARED_TOKEN_USER, "admin")
        tokens = self.tokens
        if tokens is None:
            return None

        def find() -> Principal | None:
            found = tokens.lookup(given)
            return None if found is None else Principal(*found)

        from triage_core.worklist.tokens import token_hash

        return self._cached("t:" + token_hash(given), find)

    def _proxy_principal(self, user: str) -> Principal:
        name = re.sub(r"[^A-Za-z0-9._@-]", "_", user.strip())[:64] or "proxy-user"
        tokens = self.tokens
        if tokens is None:
            return Principal(name, "viewer")

        def find() -> Principal | None:
            return Principal(name, tokens.role_of(name) or "viewer")

        return self._cached("p:" + name, find) or Principal(name, "viewer")

    def _has_named_tokens(self) -> bool:
        if self.tokens is None:
            return False
        now = time.monotonic()
        with self._lock:
            if self._named is not None and now - self._named[0] < CACHE_SECONDS:
                return self._named[1]
        named = self.tokens.active_count() > 0
        with self._lock:
            self._named = (now, named)
        return named

    def identify(self, request: HTTPConnection) -> Principal | None:
        """The request's principal, ``None`` when it must be refused (blocking: DB lookups)."""
        if self.proxy_header is not None:
            user = request.headers.get(self.proxy_header)
            if user:
                return self._proxy_principal(user)
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            found = self._token_principal(value.strip())
            if found is not None:
                return found
        cookie = request.cookies.get(COOKIE)
        if cookie:
            found = self._token_principal(cookie)
            if found is not None:
                return found
        if self.token is None and self.proxy_header is None and not self._has_named_tokens():
            return ANONYMOUS
        return None

    def token_login(self, request: HTTPConnection) -> Response | None:
        """``?token=`` with a valid token: set the cookie, redirect without the token."""
        given = request.query_params.get("token")
        if given is None or request.scope.get("method") != "GET":
            return None
        if self._token_principal(given) is None:
            return None
        rest = [(k, v) for k, v in parse_qsl(request.url.query) if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE, given, httponly=True, samesite="strict", secure=self.secure, path="/"
        )
        return response

    def refusal(self, request: HTTPConnection) -> tuple[Response | None, Principal | None]:
        """``(answer, principal)`` of a request (blocking: token lookups): an answer that ends
        it here (the ``?token=`` login redirect, 401, 403), or ``None`` and who it is."""
        if "token" in request.query_params:
            login = self.token_login(request)
            if login is not None:
                return login, None
        principal = self.identify(request)
        if principal is None:
            return (
                PlainTextResponse(
                    "401 Unauthorized: this cxr-triage server needs an access token "
                    "(Authorization: Bearer TOKEN, or open a page once with ?token=TOKEN)",
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="cxr-triage"'},
                ),
                None,
            )
        if stores(request) and not may_store(principal):
            return (
                JSONResponse(
                    status_code=403,
                    content={
                        "detail": f"storing (STOW-RS) needs the role {STORE_ROLE} or admin; "
                        f"{principal.name or 'this request'} has the role {principal.role}"
                    },
                ),
                None,
            )
        return None, principal


class AccessMiddleware:
    """:class:`AccessGuard` as a plain ASGI middleware on every HTTP and WebSocket request.

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one wraps every
    ``receive()`` of the body in a task group (a STOW-RS body of 200 MB is read in thousands
    of pieces) and does not see WebSocket connections at all. Here the guard runs once per
    request, before the application, and the body streams to the route untouched. A refused
    WebSocket is closed with code 1008 (policy violation) before it is accepted.
    """

    def __init__(self, app: ASGIApp, guard: AccessGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request = Request(scope) if scope["type"] == "http" else HTTPConnection(scope)
        answer, principal = await run_in_threadpool(self.guard.refusal, request)
        if principal is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            elif answer is not None:
                await answer(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
