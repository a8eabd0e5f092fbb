"""Optional API key: `Authorization: Bearer <key>` on every endpoint but /health and /ready.

The key comes from an environment variable (serve --api-key-env, default FLUX_KONTEXT_API_KEY),
never from the command line, where `ps` would show it. Unset or empty: no authentication (the
server binds 127.0.0.1 by default). CORS preflights pass through: browsers send them without
credentials, and CORS itself is off unless --cors-origins is given.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_body

OPEN_PATHS = frozenset({"/health", "/ready"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            await self.app(scope, receive, send)
            return
        problem = "missing API key: send Authorization: Bearer <key>" if not header else "invalid API key"
        request_id = scope.get("state", {}).get("request_id")
        response = JSONResponse(
            error_body("unauthorized", problem, "Authorization", request_id),
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="flux-kontext"'},
        )
        await response(scope, receive, send)
