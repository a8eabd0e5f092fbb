"""Running the app under uvicorn with a bounded drain on SIGTERM.

uvicorn alone, on SIGTERM, closes its listening socket at once (new clients get "connection
refused") and then waits for open connections. Here the first SIGTERM (or Ctrl+C) starts a drain
instead: the socket stays open, new work gets 503 + Connection: close, /ready turns 503 so a load
balancer stops routing here, queued and running jobs finish and their clients get their answers.
When nothing is left, uvicorn's own shutdown runs; either way the process exits at most
`drain_timeout` seconds after the signal (the drain and uvicorn's graceful shutdown share that one
deadline, so a stalled client cannot stretch it). A second signal skips the drain; a third Ctrl+C
forces the exit.
"""

from __future__ import annotations

import json
import logging
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body

log = logging.getLogger("flux_kontext.service")
SHUTDOWN_MARGIN_S = 1.0  # of the deadline, kept for closing connections after the drain


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering a malformed request (a non-numeric Content-Length, a
    broken request line) in the service's JSON error shape instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body("bad_request", f"malformed HTTP request: {msg}", "request")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service
        service.on_fatal = self._fatal

    def handle_exit(self, sig: int, frame) -> None:
        if self.service.drain_deadline is None and not self.should_exit:
            self.service.begin_drain()
            return  # not captured: a completed drain exits with status 0, not by re-raising the signal
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.service.drain_deadline is not None and not self.should_exit:
            remaining = self.service.drain_deadline - time.monotonic()
            if self.service.drained():
                log.info("drained: every accepted request was answered; shutting down")
                self._exit(remaining)
            elif remaining <= SHUTDOWN_MARGIN_S:
                log.warning("drain timeout (%.0f s) reached with work left; shutting down anyway", self.service.settings.drain_s)
                self._exit(remaining)
        return await super().on_tick(counter)

    def _exit(self, remaining_s: float) -> None:
        # uvicorn's graceful shutdown gets what is left of the one deadline, no more.
        self.config.timeout_graceful_shutdown = max(1, int(remaining_s))
        self.should_exit = True

    def _fatal(self, message: str) -> None:
        log.error("stopping the server: %s", message)
        self.should_exit = True


def serve(app, host: str, port: int, log_level: str = "info") -> int:
    """Run until drained or stopped; 2 when the model could not be loaded, else 0."""
    service = app.state.service
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=JsonErrorH11Protocol, server_header=False, timeout_graceful_shutdown=1
    )
    DrainingServer(config, service).run()
    return 2 if service.phase == "failed" else 0
