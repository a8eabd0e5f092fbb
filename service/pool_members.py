"""The front's side of each worker process of `serve --gpus` (service/worker_pool.py): its record
(state, pipes, the jobs it holds, what it last reported), its Prometheus series, and the exception
a job raised there, rebuilt here."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Callable

from .jobs import GpuOutOfMemory, Job, JobFailed, WorkerDied


@dataclass(eq=False)
class WorkerProcess:
    index: int
    gpu: str | None  # the GPU id it owns; None for a CPU worker
    state: str = "starting"  # starting -> ready -> restarting -> starting ... | failed | stopped
    process: Any = None
    inbox: Any = None  # the front's end: jobs and cancels go in
    outbox: Any = None  # the front's end: acks and results come out
    pid: int | None = None
    restarts: int = 0
    next_start: float = 0.0
    completed: int = 0
    error: str | None = None
    started_at: float = 0.0
    startup: dict = field(default_factory=dict)  # what it said when ready, and its warm-ups since
    warmup: dict | None = None  # its shapes warmed and pending (BackgroundWarmups.status)
    status: dict = field(default_factory=dict)  # memory, variants and adapters after its latest job
    last_exit: dict | None = None
    sent: dict[int, Job] = field(default_factory=dict)  # handed over, not started
    building: dict[int, Job] = field(default_factory=dict)  # waiting there for their variant's build: no slot taken
    running: dict[int, Job] = field(default_factory=dict)  # acked as started
    asks: dict[int, Callable] = field(default_factory=dict)  # read-only calls sent, not answered: id -> resolve
    holding: Any = None  # the affinity of the last job sent to it: what its engine holds (merge mode: an adapter set)

    @property
    def load(self) -> int:
        """Slots in use: a running job that yields leaves its slot to the jobs it lets through."""
        return len(self.sent) + sum(1 for job in self.running.values() if not getattr(job.call, "yields", False))

    def report(self) -> dict:
        running = next(iter(self.running.values()), None)
        return {
            "worker": self.index,
            "gpu": self.gpu,
            "device": f"cuda:{self.gpu}" if self.gpu is not None else "cpu",
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "running": running.kind if running else None,
            "running_for_s": round(running.run_s, 3) if running else None,
            "buffered": len(self.sent),
            "building": len(self.building),
            "completed": self.completed,
            "error": self.error,
            "last_exit": self.last_exit,
            "startup": self.startup,
            "warmup": self.warmup,
            "memory": self.status.get("memory"),
            "variants": self.status.get("variants", []),
            "loras": [adapter["name"] for adapter in (self.status.get("loras") or {}).get("loaded", [])],
        }


def rebuild_error(outcome: str, kind: str, portable: tuple[str, str, bytes | None]) -> BaseException:
    """The worker's exception on this side: the original when it unpickles, else its name and message."""
    name, text, blob = portable
    error: BaseException | None = None
    if blob is not None:
        try:
            error = pickle.loads(blob)
        except Exception:  # noqa: BLE001
            error = None
    if error is None:
        error = WorkerDied(text) if name == "WorkerDied" else RuntimeError(f"{name}: {text}")
    if outcome == "out_of_memory":
        return error if isinstance(error, GpuOutOfMemory) else GpuOutOfMemory(text)
    if outcome == "failed":
        return error if isinstance(error, (JobFailed, WorkerDied)) else JobFailed(kind, error)
    return error  # refused (the job's own reason, e.g. a LoraError) or cancelled (EditCancelled, JobCancelled), as raised


class WorkerMetrics:
    """Prometheus series per worker process, in the service's registry."""

    def __init__(self, metrics, workers: list[WorkerProcess]):
        from prometheus_client import Counter, Gauge

        registry = metrics.registry
        self.up = Gauge("kontext_worker_up", "1 while the worker has its engine loaded and takes jobs", ["worker"], registry=registry)
        self.running = Gauge("kontext_worker_jobs_running", "Jobs running in the worker (0 or 1)", ["worker"], registry=registry)
        self.restarts = Counter("kontext_worker_restarts_total", "Restarts after the worker died", ["worker"], registry=registry)
        self.jobs = Counter("kontext_worker_jobs_total", "Jobs the worker finished, by outcome", ["worker", "outcome"], registry=registry)
        self.gpu_memory = Gauge(
            "kontext_worker_gpu_memory_bytes", "The worker's GPU memory after its latest job", ["worker", "kind"], registry=registry
        )
        for worker in workers:
            label = str(worker.index)
            self.up.labels(label).set_function(lambda worker=worker: 1 if worker.state == "ready" else 0)
            self.running.labels(label).set_function(lambda worker=worker: len(worker.running))
            self.restarts.labels(label)

    def memory(self, worker: WorkerProcess) -> None:
        for key, value in ((worker.status or {}).get("memory") or {}).items():
            if key.endswith("_gb") and isinstance(value, (int, float)):
                self.gpu_memory.labels(str(worker.index), key[: -len("_gb")]).set(value * 2**30)
