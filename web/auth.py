"""Bearer-token authentication, on when ``WebSettings.api_token`` is set.

Every request needs ``Authorization: Bearer <token>`` except the health probes
(``/v2/health/*``) and the status page's own files (``/``, ``/static/*``), which hold no data.
The page asks the person for the token once, keeps it in ``sessionStorage``, sends it as that
header, and trades it at ``POST /v1/session`` for an ``HttpOnly`` cookie, because a browser's
``EventSource`` cannot send headers. The cookie carries a value derived from the token (an
HMAC), never the token itself, is ``SameSite=Strict``, and is accepted only on ``GET`` and
``HEAD``, so a page on another site can neither read it nor make it change anything. Tokens
are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from http.cookies import SimpleCookie

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["SESSION_COOKIE", "AuthMiddleware", "router", "session_value"]

SESSION_COOKIE = "armdi_session"
PUBLIC_PREFIXES = ("/v2/health/", "/static/")
PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})
COOKIE_METHODS = frozenset({"GET", "HEAD"})

router = APIRouter(prefix="/v1", tags=["session"])


def session_value(token: str) -> str:
    """What the session cookie holds for ``token``: derived from it, useless elsewhere."""
    return hmac.new(token.encode(), b"armdi status page session", hashlib.sha256).hexdigest()


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class AuthMiddleware:
    """Answers 401 to a request without the right token (pure ASGI: streams stay streams)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        self.session = session_value(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]) or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await self._reject(scope, send)

    def _allowed(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and _same(credentials.strip(), self.token):
            return True
        if scope["method"] not in COOKIE_METHODS or b"cookie" not in headers:
            return False
        cookies = SimpleCookie()
        try:
            cookies.load(headers[b"cookie"].decode("latin-1"))
        except Exception:  # a malformed Cookie header is no credential
            return False
        morsel = cookies.get(SESSION_COOKIE)
        return morsel is not None and _same(morsel.value, self.session)

    @staticmethod
    async def _reject(scope: Scope, send: Send) -> None:
        path = scope["path"]
        message = "this server needs an API token: send 'Authorization: Bearer <token>'"
        key = "error" if path == "/v2" or path.startswith("/v2/") else "detail"
        body = json.dumps({key: message}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="armdi"')]})
        await send({"type": "http.response.body", "body": body})


@router.post("/session", status_code=204)
async def open_session(request: Request) -> Response:
    """Set the session cookie the status page's event stream needs. Needs the bearer token
    (the middleware checked it); without a token configured there is nothing to set."""
    response = Response(status_code=204)
    token: str | None = request.app.state.settings.api_token
    if token is not None:
        response.set_cookie(SESSION_COOKIE, session_value(token), httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")
    return response


@router.delete("/session", status_code=204)
async def close_session() -> Response:
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
