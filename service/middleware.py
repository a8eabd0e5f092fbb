"""The outer request layer: request ids, the body cap, the drain gate, in-flight counting, metrics.

Pure ASGI (no BaseHTTPMiddleware): it must see disconnects and must not buffer bodies.
"""

from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_body
from .metrics import outcome_for_status

WORK_PREFIXES = ("/inference", "/v1/", "/benchmark")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def is_work(path: str) -> bool:
    return path.startswith(WORK_PREFIXES)


class RequestTrackingMiddleware:
    def __init__(self, app: ASGIApp, service):
        self.app = app
        self.service = service
        self._known_paths: frozenset | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = self.service
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        work = is_work(scope["path"])
        try:
            early = self._early_answer(scope, headers, work, request_id)
            if early is not None:
                await early(scope, receive, send_tracked)
                return
            if work:
                service.in_flight += 1
            try:
                await self.app(scope, self._limited(receive), send_tracked)
            finally:
                if work:
                    service.in_flight -= 1
        finally:
            endpoint = self._endpoint(scope)
            service.metrics.requests.labels(endpoint, scope["method"], outcome_for_status(status)).inc()
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _endpoint(self, scope: Scope) -> str:
        """The route's path template, never the raw path (which would let clients mint label values)."""
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        if self._known_paths is None and scope.get("app") is not None:
            self._known_paths = frozenset(getattr(r, "path", None) for r in getattr(scope["app"], "routes", []))
        return scope["path"] if self._known_paths and scope["path"] in self._known_paths else "unmatched"

    def _early_answer(self, scope: Scope, headers: Headers, work: bool, request_id: str) -> JSONResponse | None:
        limit = self.service.settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                body = error_body("bad_request", "Content-Length is not a number", "Content-Length", request_id)
                return JSONResponse(body, status_code=400, headers={"Connection": "close"})
            if int(length) > limit:
                # Answered before reading a byte; the connection closes because the body is left unread.
                message = f"the request body ({int(length) / 2**20:.1f} MB) is over the {limit / 2**20:g} MB limit (serve --max-body-mb)"
                return JSONResponse(error_body("body_too_large", message, "body", request_id), status_code=413, headers={"Connection": "close"})
        if work and self.service.draining:
            message = "the server is shutting down and takes no new work; retry on another instance"
            return JSONResponse(error_body("shutting_down", message, None, request_id), status_code=503, headers={"Retry-After": "5", "Connection": "close"})
        return None

    def _limited(self, receive: Receive) -> Receive:
        """Count bytes as they arrive (chunked bodies have no Content-Length to check up front)."""
        limit = self.service.settings.max_body_bytes
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise APIError(413, "body_too_large", f"the request body is over the {limit / 2**20:g} MB limit (serve --max-body-mb)", field="body")
            return message

        return receive_limited
