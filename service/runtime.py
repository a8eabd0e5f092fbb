"""The service's moving parts in one object: the engine (loaded in the background), the GPU worker,
metrics, the benchmark job, and the lifecycle (loading -> warming -> ready -> draining).

The engine is loaded by the GPU worker itself, as its first job, so that the HTTP side is up at
once: /health answers while the model loads, /ready says 503 until it is loaded and warmed.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from engine import __version__
from engine.compile_artifacts import bundle_key, compile_counters, default_bundle_path, describe, load_bundle
from engine.compile_cache import active_cache_dir
from engine.engine import KontextEngine
from engine.loading import ModelLoadError
from engine.setting import public_values
from engine.warmup import warm_up

from .benchmark_jobs import BenchmarkJobs
from .errors import APIError
from .metrics import ServiceMetrics
from .queue import GpuWorker
from .settings import ServiceSettings

log = logging.getLogger("flux_kontext.service")

EngineLoader = Callable[[], KontextEngine]
DECODE_SLOTS = 4  # input images decoded at once (each can hold tens of MB of pixels)


class Service:
    def __init__(self, settings: ServiceSettings, engine: KontextEngine | None = None, loader: EngineLoader | None = None):
        if engine is None and loader is None:
            raise ValueError("give an engine or a loader")
        self.settings = settings
        self.version = __version__
        self.metrics = ServiceMetrics()
        self.worker = GpuWorker(settings.queue_size, self.metrics)
        self.engine = engine
        self._loader = loader
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
            running=lambda: 1 if self.worker.running else 0,
            ready=lambda: 1 if self.ready else 0,
            memory=self.gpu_memory_bytes,
            loras=self.lora_counts,
        )

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker and queue loading and warm-up (idempotent)."""
        with self._start_lock:
            if self._started:
                return
            self._started = True
        self.worker.start()
        self.phase = "loading"
        self.worker.submit("load", self._load, system=True)

    def _load(self) -> None:
        try:
            if self.engine is None:
                started = time.perf_counter()
                self.engine = self._loader()
                self.startup["load_s"] = round(time.perf_counter() - started, 2)
                log.info("model loaded in %.1f s: %s", self.startup["load_s"], self.engine.model_info.get("name"))
            if self.settings.warmup:
                self.phase = "warming"
                self._load_compile_artifacts()
                # Every shape a request at a preferred resolution reaches, so that none pays a
                # compile or a CUDA-graph recording after /ready (engine/warmup.py).
                report = warm_up(self.engine)
                self.startup["warmup"] = report.as_dict()
                self.startup["compile_counters"] = compile_counters()  # cache hits, misses, bypasses: what the warm-up compiled
            self.startup["ready_after_service_start_s"] = round(time.time() - self.started_at, 2)  # imports come before
            self.phase = "ready"
        except Exception as error:  # noqa: BLE001 - reported on /health and /ready, and ends the server
            self.phase = "failed"
            self.error = f"{type(error).__name__}: {error}"
            expected = isinstance(error, (ModelLoadError, OSError))  # user-fixable: the message says what to do
            log.error("the model could not be loaded or warmed up: %s", self.error, exc_info=None if expected else error)
            if self.on_fatal:
                self.on_fatal(self.error)

    def _load_compile_artifacts(self) -> None:
        """Before the first compile: a bundle from --compile-artifacts, else the one `precompile`
        left in the compile cache directory for exactly this setup, if any."""
        key = bundle_key(self.engine.env, self.engine.resolve().effective)
        path = self.settings.compile_artifacts
        if path is None and active_cache_dir() is not None:
            path = default_bundle_path(active_cache_dir(), key)
        outcome = load_bundle(Path(path) if path else None, key)
        self.startup["compile_artifacts"] = outcome.as_dict()
        # The default place is empty on every start without `precompile` (and always with compile
        # off): worth a line only when a bundle was asked for or found there.
        found = path is not None and Path(path).is_file()
        log.log(logging.INFO if self.settings.compile_artifacts is not None or found else logging.DEBUG, describe(outcome))

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.settings.drain_s
            if self.benchmarks.cancel():  # a background job nobody waits on: stop it after its current edit
                log.info("draining: the running benchmark is cancelled")
            log.info(
                "draining: new work is refused with 503; %d waiting, %s running",
                self.worker.waiting,
                self.worker.running.kind if self.worker.running else "nothing",
            )

    def drained(self) -> bool:
        return self.in_flight == 0 and self.worker.idle

    def stop(self) -> None:
        """Stop the worker, waiting for its running job at most until the drain deadline."""
        remaining = (self.drain_deadline - time.monotonic()) if self.drain_deadline is not None else self.settings.drain_s
        self.worker.stop(max(0.0, remaining))

    # -- state ----------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.phase == "ready" and not self.draining

    @property
    def status(self) -> str:
        return "draining" if self.draining else self.phase

    def require_ready(self) -> KontextEngine:
        """The engine, or a 503 that says why there is none to use yet."""
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
        return self.engine

    def engine_call(self, call) -> Callable[[], object]:
        """A job for this service's worker that runs `call` (service/engine_calls.py) on the engine."""
        return lambda: call.run(self.engine)

    def gpu_memory_bytes(self) -> dict[str, int]:
        if self.engine is None or not self.engine.env.has_cuda:
            return {}
        index = self.engine.env.gpu.index
        free, total = torch.cuda.mem_get_info(index)
        return {
            "allocated": torch.cuda.memory_allocated(index),
            "reserved": torch.cuda.memory_reserved(index),
            "free": free,
            "total": total,
        }

    def lora_counts(self) -> tuple[int, int]:
        if self.engine is None or self.engine.loras is None:
            return 0, 0
        loaded = self.engine.loras.loaded()
        return len(loaded), sum(adapter.nbytes for adapter in loaded)

    def health(self) -> dict:
        engine = self.engine
        body = {
            "status": self.status,
            "ready": self.ready,
            "version": self.version,
            "uptime_s": round(time.time() - self.started_at, 1),
            "error": self.error,
            "model": engine.model_info if engine else None,
            "device": str(engine.loaded.device) if engine else None,
            "environment": engine.env.summary() if engine else None,
            "memory": engine.memory() if engine else None,
            "memory_plan": engine.memory_report() if engine else None,
            "default_optimizations": engine.default_config.model_dump() if engine else None,
            "stages": engine.stage_status() if engine else [],
            "variants": engine.variants.report() if engine else [],
            "startup": self.startup,
            "loras": engine.loras.report(with_files=False) if engine and engine.loras is not None else None,
            "queue": {**self.worker.snapshot(), "in_flight_requests": self.in_flight},
            "benchmark": self.benchmarks.summary(),
            "limits": self.limits(),
            "auth": "api key" if self.settings.api_key else "off",
        }
        return body

    def limits(self) -> dict:
        """What clients may read of the settings (the fields declared public), and the values that
        depend on the model or on other settings."""
        settings = self.settings
        derived = {"size": [self.min_side(), settings.max_size], "drain_timeout": settings.drain_s}
        return {**public_values(settings), **derived, "benchmark_runs_allowed": settings.benchmark_runs_allowed}

    def min_side(self) -> int:
        snaps = self.engine.loaded.spec.snap_input_to_kontext_resolutions if self.engine else True
        return self.settings.min_side_for(snaps)
