"""The outer request layer: request ids, the body cap and body timeout, the drain gate, in-flight
counting, metrics.

Pure ASGI (no BaseHTTPMiddleware): it must see disconnects and must not buffer bodies.

Two things here protect the server from slow or greedy clients. The body must arrive within
`body_timeout` (a client that stalls mid-upload gets 408 instead of holding a connection, and the
shutdown, for ever). A body over the cap is refused with 413, but only after reading and discarding
what the client is still sending (bounded, like nginx's lingering close): a client that does not
wait for `100-continue` would otherwise see a connection reset instead of the answer.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_body
from .metrics import outcome_for_status

WORK_PREFIXES = ("/inference", "/v1/", "/lora", "/benchmark")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LINGER_MAX_BYTES = 512 * 2**20  # the most an over-limit client may make us read and discard
LINGER_MAX_S = 10.0


def is_work(path: str) -> bool:
    return path.startswith(WORK_PREFIXES)


class RequestTrackingMiddleware:
    def __init__(self, app: ASGIApp, service, route_paths: frozenset[str]):
        self.app = app
        self.service = service
        self.route_paths = route_paths  # the app's own paths: label values come only from these

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
            early = self._early_answer(headers, work, request_id)
            if early is not None:
                if early.status_code == 413 and headers.get("expect", "").lower() != "100-continue":
                    await _discard_body(receive, time.monotonic() + min(LINGER_MAX_S, service.settings.body_timeout))
                await early(scope, receive, send_tracked)
                return
            if work:
                service.in_flight += 1
            try:
                await self.app(scope, self._guarded(receive), send_tracked)
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
        return scope["path"] if scope["path"] in self.route_paths else "unmatched"  # answered before routing

    def _early_answer(self, headers: Headers, work: bool, request_id: str) -> JSONResponse | None:
        """Answers that need no route: a body that is too large or compressed, or a server that drains."""
        limit = self.service.settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            message = f"the request body ({int(length) / 2**20:.1f} MB) is over the {limit / 2**20:g} MB limit (serve --max-body-mb)"
            return JSONResponse(error_body("body_too_large", message, "body", request_id), status_code=413, headers={"Connection": "close"})
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if work and encoding not in ("", "identity"):
            message = f"Content-Encoding {encoding} is not accepted: send the body uncompressed (images are compressed already)"
            return JSONResponse(error_body("unsupported_media_type", message, "Content-Encoding", request_id), status_code=415)
        if work and self.service.draining:
            message = "the server is shutting down and takes no new work; retry on another instance"
            return JSONResponse(
                error_body("shutting_down", message, None, request_id), status_code=503, headers={"Retry-After": "5", "Connection": "close"}
            )
        return None

    def _guarded(self, receive: Receive) -> Receive:
        """The body under the cap (counted as it arrives: chunked bodies have no Content-Length) and
        within the body timeout; after the body, receive() passes through (disconnect checks)."""
        settings = self.service.settings
        deadline = time.monotonic() + settings.body_timeout
        received = 0
        body_done = False

        async def receive_guarded() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise APIError(
                    408,
                    "body_timeout",
                    f"the request body did not arrive within {settings.body_timeout:g} s (serve --body-timeout)",
                    field="body",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request":
                return message
            body_done = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > settings.max_body_bytes:
                if not body_done:
                    await _discard_body(receive, min(deadline, time.monotonic() + LINGER_MAX_S))
                body_done = True
                raise APIError(
                    413,
                    "body_too_large",
                    f"the request body is over the {settings.max_body_bytes / 2**20:g} MB limit (serve --max-body-mb)",
                    field="body",
                    headers={"Connection": "close"},
                )
            return message

        return receive_guarded


async def _discard_body(receive: Receive, deadline: float) -> None:
    """Read and drop the rest of a body (at most LINGER_MAX_BYTES, until `deadline`), so that a
    client still sending it can read the answer instead of a connection reset."""
    discarded = 0
    while discarded < LINGER_MAX_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), timeout=remaining)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        discarded += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
