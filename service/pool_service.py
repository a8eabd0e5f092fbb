"""The service with one worker process per GPU (`serve --gpus`): the same routes, limits and
lifecycle as `Service`, but the engines live in the workers (service/worker_pool.py), and the front
keeps only what it needs to check requests and answer /health: the model's description, which the
first worker to load sends (`RemoteEngine`).

The front never touches CUDA: the workers are spawned, and a CUDA context in the front would cost
memory on the first GPU for nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .benchmark_jobs import BenchmarkJobs
from .errors import APIError
from .runtime import Service
from .settings import ServiceSettings
from .worker_pool import WorkerPool, WorkerProcess

log = logging.getLogger("flux_kontext.service")


@dataclass
class _Loaded:
    spec: Any  # engine.model_specs.ModelSpec
    device: str


class _RemoteEnvironment:
    def __init__(self, summary: dict, has_cuda: bool):
        self._summary, self.has_cuda = summary, has_cuda

    def summary(self) -> dict:
        return self._summary


class _RemoteVariants:
    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def report(self) -> list[dict]:
        return [{"worker": worker["worker"], **row} for worker in self.pool.workers_report() for row in worker["variants"] or []]


class RemoteEngine:
    """What the front knows of the workers' engines (all load the same model with the same config)."""

    def __init__(self, info: dict, pool: WorkerPool):
        self.pool = pool
        self.model_info = info["model_info"]
        self.default_config = info["default_config"]
        self.env = _RemoteEnvironment(info["environment"], info["has_cuda"])
        devices = [worker.report()["device"] for worker in pool.workers]
        self.loaded = _Loaded(info["spec"], f"{len(devices)} worker processes: {', '.join(devices)}")
        self.variants = _RemoteVariants(pool)
        self._stages = info["stages"]

    # Adapters live in each worker's own library (serve --preload-lora loads them in every worker);
    # the front manages none, so the /v1/loras routes answer 501 here.
    loras = None

    def stage_status(self, config=None) -> list[dict]:
        return self._stages

    def memory_report(self) -> dict | None:
        return None  # each worker chose its own memory plan: see /health's workers

    def memory(self) -> dict:
        return {str(worker["worker"]): worker["memory"] for worker in self.pool.workers_report()}


class _NoBenchmarks(BenchmarkJobs):
    def start(self, stages: list[int]) -> dict:
        raise APIError(
            501,
            "not_implemented",
            "this server runs one worker process per GPU (serve --gpus), where /benchmark does not run; "
            "run `flux_kontext_optimized.py benchmark` on one GPU, or `python -m benchmarks.scale_out` for the scaling table",
        )


class PoolService(Service):
    def __init__(self, settings: ServiceSettings, gpus: list[str | None], loader: Callable[[str], Any], slots: int = 1):
        super().__init__(settings, loader=loader)
        self.worker = WorkerPool(
            gpus, loader, settings, settings.queue_size, self.metrics, slots=slots, on_ready=self._worker_ready, on_failed=self._all_failed
        )
        self.benchmarks = _NoBenchmarks(self)
        self._ready_lock = threading.Lock()
        self.metrics.bind(
            waiting=lambda: self.worker.waiting,
            running=lambda: self.worker.running_count,
            ready=lambda: 1 if self.ready else 0,
            memory=self.gpu_memory_bytes,
        )

    def start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._started = True
        self.phase = "loading"
        self.worker.start()

    def _worker_ready(self, worker: WorkerProcess) -> None:
        with self._ready_lock:
            if self.engine is None:
                self.engine = RemoteEngine(worker.info, self.worker)
                self.startup["first_worker_ready_s"] = round(worker.info["startup"].get("load_s", 0.0), 2)
                self.phase = "ready"

    def _all_failed(self, message: str) -> None:
        self.phase, self.error = "failed", f"no worker could serve: {message}"
        log.error(self.error)
        if self.on_fatal:
            self.on_fatal(self.error)

    def engine_call(self, call):
        return call  # shipped to a worker process, which runs it on its own engine

    @property
    def ready(self) -> bool:
        return super().ready and self.worker.ready_workers > 0

    def require_ready(self):
        engine = super().require_ready()
        if self.worker.ready_workers == 0:
            raise APIError(
                503, "model_loading", "every worker process is restarting; retry shortly (see /health)", headers={"Retry-After": "5"}
            )
        return engine

    def gpu_memory_bytes(self) -> dict[str, int]:
        return {}  # per worker: kontext_worker_gpu_memory_bytes

    def health(self) -> dict:
        body = super().health()
        body["workers"] = self.worker.workers_report()
        return body
