"""The service's moving parts in one object: the worker that reaches the engine(s), metrics, the
benchmark job, and the lifecycle (loading -> warming -> ready -> draining).

The worker is either the in-process GPU worker (one engine) or a pool of worker processes
(`serve --gpus`); the service sees both through one interface (service/worker.py) and describes the
model from what the engine said about itself (`model`, an EngineDescription), so every route works
the same in both. The engine is loaded by the worker in the background, so that the HTTP side is up
at once: /health answers while the model loads, /ready says 503 until it is loaded and warmed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from engine import __version__
from engine.model_specs import ModelLoadError
from engine.setting import public_values

from .benchmark_jobs import BenchmarkJobs
from .engine_calls import EngineDescription
from .errors import APIError
from .metrics import ServiceMetrics
from .queue import GpuWorker
from .settings import ServiceSettings
from .worker import Worker

log = logging.getLogger("flux_kontext.service")

EngineLoader = Callable[[], Any]
DECODE_SLOTS = 4  # input images decoded at once (each can hold tens of MB of pixels)


class Service:
    def __init__(
        self,
        settings: ServiceSettings,
        engine=None,
        loader: EngineLoader | None = None,
        worker: Callable[[ServiceMetrics], Worker] | None = None,
    ):
        """One engine given (`engine`, tests) or loaded (`loader`) by the in-process worker, or any
        worker made by `worker(metrics)` (a WorkerPool for `serve --gpus`)."""
        if engine is None and loader is None and worker is None:
            raise ValueError("give an engine, a loader or a worker")
        self.settings = settings
        self.version = __version__
        self.metrics = ServiceMetrics()
        if worker is None:
            worker = lambda metrics: GpuWorker(settings.queue_size, metrics, loader=loader, settings=settings, engine=engine)  # noqa: E731
        self.worker: Worker = worker(self.metrics)
        self.worker.on_event = self._on_worker_event
        self.phase = "starting"  # starting -> loading -> warming -> ready | failed
        self.error: str | None = None
        self.draining = False
        self.drain_deadline: float | None = None  # monotonic time by which the process must have exited
        self.started_at = time.time()
        self.in_flight = 0  # work requests between arrival and response
        self.startup: dict = {}  # load and warm-up seconds, warmed shapes, compile artifacts: /health reports it
        self.on_fatal: Callable[[str], None] | None = None  # set by the server runner: exit when loading fails
        self.benchmarks = BenchmarkJobs(self)
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self._start_lock = threading.Lock()
        self._started = False
        self.metrics.bind(
            waiting=lambda: self.worker.waiting,
            running=lambda: len(self.worker.running),
            building=lambda: self.worker.building,
            ready=lambda: 1 if self.ready else 0,
            memory=self.worker.gpu_memory_bytes,
            loras=lambda: self.worker.engine_status().get("lora_counts", (0, 0)),
            warmup=self.worker.warmup_status,
        )

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker, which loads and warms the engine(s) in the background (idempotent)."""
        with self._start_lock:
            if self._started:
                return
            self._started = True
        self.phase = "loading"
        self.worker.start()

    def _on_worker_event(self, event: str, payload) -> None:
        if event == "warming":
            self.phase = "warming"
        elif event == "ready":
            self.startup.update(payload)
            self.startup["ready_after_service_start_s"] = round(time.time() - self.started_at, 2)  # imports come before (imports_s)
            self.phase = "ready"
        elif event == "failed":
            self.phase = "failed"
            error = payload
            self.error = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else f"no worker could serve: {error}"
            expected = not isinstance(error, BaseException) or isinstance(error, (ModelLoadError, OSError))  # the message says what to do
            log.error("the model could not be loaded or warmed up: %s", self.error, exc_info=None if expected else error)
            if self.on_fatal:
                self.on_fatal(self.error)

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.settings.drain_s
            if self.benchmarks.cancel():  # a background job nobody waits on: stop it after its current edit
                log.info("draining: the running benchmark is cancelled")
            running = self.worker.running
            log.info(
                "draining: new work is refused with 503; %d waiting, %s running",
                self.worker.waiting,
                ", ".join(job.kind for job in running) or "nothing",
            )

    def drained(self) -> bool:
        return self.in_flight == 0 and self.worker.idle

    def stop(self) -> None:
        """Stop the worker, waiting for its running job at most until the drain deadline."""
        remaining = (self.drain_deadline - time.monotonic()) if self.drain_deadline is not None else self.settings.drain_s
        self.worker.stop(max(0.0, remaining))

    # -- state ----------------------------------------------------------------------------------------
    @property
    def model(self) -> EngineDescription | None:
        """The model the engine(s) loaded, once one has."""
        return self.worker.description

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and not self.draining and self.worker.ready_engines > 0

    @property
    def status(self) -> str:
        return "draining" if self.draining else self.phase

    def require_ready(self) -> EngineDescription:
        """The model's description, or a 503 that says why there is nothing to use yet."""
        self.start()
        if self.draining:
            raise APIError(
                503,
                "shutting_down",
                "the server is shutting down and takes no new work; retry on another instance",
                headers={"Retry-After": "5", "Connection": "close"},
            )
        if self.phase == "failed":
            raise APIError(503, "model_unavailable", f"the model failed to load: {self.error}")
        if self.phase != "ready":
            raise APIError(
                503,
                "model_loading",
                f"the model is {self.phase}; retry shortly (GET /ready turns 200 when it can serve)",
                headers={"Retry-After": "5"},
            )
        if self.worker.ready_engines == 0:
            raise APIError(
                503, "model_loading", "every worker process is restarting; retry shortly (see /health)", headers={"Retry-After": "5"}
            )
        return self.model

    def health(self) -> dict:
        model = self.model
        status = self.worker.engine_status() if model else {}
        body = {
            "status": self.status,
            "ready": self.ready,
            "version": self.version,
            "uptime_s": round(time.time() - self.started_at, 1),
            "error": self.error,
            "model": model.model_info if model else None,
            "device": model.device if model else None,
            "environment": model.environment if model else None,
            "memory": status.get("memory"),
            "memory_plan": model.memory_plan if model else None,
            "default_optimizations": model.default_config.model_dump() if model else None,
            "stages": model.stages if model else [],
            "variants": status.get("variants", []),
            "startup": {**self.startup, **self.worker.warmup_report()},  # the warm-ups go on after /ready
            "warmup": self.worker.warmup_status(),
            "loras": status.get("loras"),
            "queue": {**self.worker.snapshot(), "in_flight_requests": self.in_flight},
            "benchmark": self.benchmarks.summary(),
            "limits": self.limits(),
            "auth": "api key" if self.settings.api_key else "off",
        }
        workers = self.worker.workers_report()
        if workers is not None:
            body["workers"] = workers
        return body

    def limits(self) -> dict:
        """What clients may read of the settings (the fields declared public), and the values that
        depend on the model or on other settings."""
        settings = self.settings
        derived = {"size": [self.min_side(), settings.max_size], "drain_timeout": settings.drain_s}
        return {**public_values(settings), **derived, "benchmark_runs_allowed": settings.benchmark_runs_allowed}

    def min_side(self) -> int:
        snaps = self.model.spec.snap_input_to_kontext_resolutions if self.model else True
        return self.settings.min_side_for(snaps)
