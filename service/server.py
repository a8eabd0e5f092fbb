"""Running the app under uvicorn with a drain on SIGTERM.

uvicorn alone, on SIGTERM, closes its listening socket at once (new clients get "connection
refused") and then waits for open connections. Here the first SIGTERM (or Ctrl+C) starts a drain
instead: the socket stays open, new work gets 503 + Connection: close, /ready turns 503 so a load
balancer stops routing here, queued and running jobs finish and their clients get their answers.
When nothing is left (or --drain-timeout passes) uvicorn's own graceful shutdown runs and the
process exits 0. A second signal skips the drain; a third Ctrl+C forces the exit.
"""

from __future__ import annotations

import logging
import time

import uvicorn

log = logging.getLogger("flux_kontext.service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service
        self.drain_deadline: float | None = None
        service.on_fatal = self._fatal

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.service.settings.drain_s
            self.service.begin_drain()
            return  # not captured: a completed drain exits with status 0, not by re-raising the signal
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.service.drained():
                log.info("drained: every accepted request was answered; shutting down")
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline:
                log.warning("drain timeout (%.0f s) passed with work left; shutting down anyway", self.service.settings.drain_s)
                self.should_exit = True
        return await super().on_tick(counter)

    def _fatal(self, message: str) -> None:
        log.error("stopping the server: %s", message)
        self.should_exit = True


def serve(app, host: str, port: int, log_level: str = "info") -> int:
    """Run until drained or stopped; 2 when the model could not be loaded, else 0."""
    service = app.state.service
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(service.settings.drain_s) + 5, server_header=False)
    DrainingServer(config, service).run()
    return 2 if service.phase == "failed" else 0
