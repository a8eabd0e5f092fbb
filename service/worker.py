"""The one interface the service uses to reach its engines, whatever runs them: the in-process GPU
worker (service/queue.py: one thread, one engine) or the worker processes of `serve --gpus`
(service/worker_pool.py: one engine per GPU). Both take the same calls (service/engine_calls.py):

    result, job = await worker.run(EditCall(...), deadline, is_disconnected)        one engine, in turn
    results = await worker.run_everywhere(LoadLora("style"), deadline)               every engine, in turn
    report = await worker.ask(ListLoras())                                           at once, never queued
    job = worker.submit(RunBenchmark(...), on_done=..., on_progress=...)             in the background

This base class is the front of both: the bounded queue (429 + Retry-After beyond it), cancelling a
job that still waits (its client left or timed out: it costs the GPU nothing), the deadline, the
accounting of a finished job. The subclasses decide where a job runs.

The asyncio side never blocks: it awaits a future that the worker resolves. A running edit stops at
its next step boundary once its deadline has passed (the engine's `should_stop`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Awaitable, Callable

from .engine_calls import EngineDescription
from .jobs import ClientGone, Job, JobTimeout, QueueFull, WorkerStopped
from .metrics import ServiceMetrics

log = logging.getLogger("flux_kontext.service.queue")

# LoRA merge mode swaps adapters into the weights when the adapter set changes (0.2-0.4 s on an H100),
# so a waiting request with the set the engine holds may run before older ones; each of those lets
# at most this many pass it, so arrival order holds within that bound.
GROUP_PASSES = 3


def waiter() -> tuple[asyncio.Future, Callable[[Job], None]]:
    """A future on the running loop, and a callback any thread may call to resolve it with a job."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def resolve(finished: Job) -> None:
        try:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(finished))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    return future, resolve


class Worker(ABC):
    def __init__(self, capacity: int, metrics: ServiceMetrics | None = None, poll_s: float = 0.2):
        self.capacity = capacity
        self.metrics = metrics
        self.poll_s = poll_s
        self._jobs: deque[Job] = deque()
        self._building: list[Job] = []  # left the queue to wait for their variant's build (service/builds.py)
        self._cond = threading.Condition()
        self._stopping = False
        self._seconds_per_job: float | None = None  # moving average of user edits, for Retry-After
        self.completed = 0
        self.description: EngineDescription | None = None  # the model, once an engine has loaded it
        # The service's ears: ("warming", None), ("ready", startup), ("failed", message)
        self.on_event: Callable[[str, Any], None] = lambda event, payload: None

    # -- lifecycle ------------------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Load the engine(s) in the background; `on_event` says when one is ready or all failed."""

    @abstractmethod
    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job(s) until `timeout`, drop the waiting ones, end."""

    # -- the engines ----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def ready_engines(self) -> int:
        """Engines loaded, warm and taking jobs."""

    @abstractmethod
    def engine_status(self) -> dict:
        """What changes as the engines serve: memory, variants, loaded adapters (for /health)."""

    def gpu_memory_bytes(self) -> dict[str, int]:
        return {}

    def warmup_status(self) -> dict | None:
        """Shapes warmed and pending (service/startup.py: BackgroundWarmups.status); None: not known here."""
        return None

    def warmup_report(self) -> dict:
        """The warm-ups' shapes and seconds so far, for /health's `startup`."""
        return {}

    def workers_report(self) -> list[dict] | None:
        """One entry per worker process (state, pid, restarts, ...); None for the in-process worker."""
        return None

    # -- running calls ---------------------------------------------------------------------------------
    @abstractmethod
    async def ask(self, call) -> Any:
        """A read-only call (ListLoras, EngineStatus), answered at once beside the running job."""

    @abstractmethod
    def stop_job(self, job: Job) -> None:
        """Ask a running job to stop at its next safe point (a benchmark, between two edits)."""

    async def run_everywhere(self, call, deadline: float, is_disconnected=None) -> list:
        """Run `call` on every engine that serves, each in its turn (one engine here)."""
        result, _job = await self.run(call, deadline, is_disconnected)
        return [result]

    def _queued(self) -> None:
        """Under the lock: a job was added; wake whoever hands jobs out."""
        self._cond.notify()

    # -- state ----------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._jobs)

    @property
    def building(self) -> int:
        """Jobs waiting for their variant to be built beside the serving thread."""
        return len(self._building)

    @property
    @abstractmethod
    def running(self) -> list[Job]:
        """The jobs running now."""

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and not self._building and not self.running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times the average job, over the engines."""
        per_job = self._seconds_per_job or 1.0
        return int(min(300, max(1, math.ceil(per_job * (self.waiting + 1) / max(1, self.ready_engines)))))

    def snapshot(self) -> dict:
        running = self.running
        return {
            "capacity": self.capacity,
            "waiting": self.waiting,
            "running": running[0].kind if len(running) == 1 else len(running) or None,
            "running_for_s": round(running[0].run_s, 3) if len(running) == 1 else None,
            "building": self.building,
            "completed": self.completed,
            "seconds_per_job": round(self._seconds_per_job, 3) if self._seconds_per_job else None,
        }

    # -- submitting -----------------------------------------------------------------------------------
    def submit(self, call, on_done=None, on_progress=None, system: bool = False, target: int | None = None) -> Job:
        """Queue a call; raises QueueFull (user jobs only: `system` jobs skip the bound)."""
        job = Job(call, on_done, on_progress, target)
        with self._cond:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            if not system and len(self._jobs) >= self.capacity:
                if self.metrics:
                    self.metrics.jobs.labels(job.kind, "rejected_queue_full").inc()
                raise QueueFull(len(self._jobs), self.retry_after())
            self._jobs.append(job)
            self._queued()
        return job

    def cancel(self, job: Job, reason: str) -> bool:
        """Drop a job that is still waiting, in the queue or for its variant's build (True); a running
        or finished job cannot be (False). A build goes on: its variant is still of use."""
        with self._cond:
            waiting_in = self._jobs if job.state == "queued" else self._building if job.state == "building" else None
            if waiting_in is None or job not in waiting_in:
                return False
            waiting_in.remove(job)
            job.state = "cancelled"
        if self.metrics:
            self.metrics.jobs.labels(job.kind, f"cancelled_{reason}").inc()
        return True

    async def run(self, call, deadline: float, is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> tuple[Any, Job]:
        """Queue `call`, wait for it without blocking the event loop, and return (result, job).

        Raises QueueFull, WorkerStopped, JobTimeout (deadline, a monotonic time, passed), ClientGone
        (dropped while waiting), GpuOutOfMemory, JobFailed, WorkerDied, or the reason of a JobRefused.
        """
        future, resolve = waiter()
        return await self._await(self.submit(call, resolve), future, deadline, is_disconnected)

    async def _await(self, job: Job, future: asyncio.Future, deadline: float, is_disconnected=None) -> tuple[Any, Job]:
        try:
            while not future.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waited = time.monotonic() - job.enqueued_at
                    if self.cancel(job, "timeout"):
                        raise JobTimeout(waited, was_running=False)
                    if job.state == "running":
                        raise JobTimeout(waited, was_running=True)
                    break  # finished this very moment
                await asyncio.wait({future}, timeout=min(self.poll_s, remaining))
                if not future.done() and job.state == "queued" and is_disconnected is not None and await is_disconnected():
                    if self.cancel(job, "client_disconnected"):
                        raise ClientGone()
        except asyncio.CancelledError:
            self.cancel(job, "cancelled")
            raise
        if job.state == "cancelled":  # stop() dropped it
            raise job.error or WorkerStopped("the server is shutting down")
        if not future.done():
            await future
        if job.error is not None:
            raise job.error
        return job.result, job

    @staticmethod
    def _pick(waiting: list[Job], holding) -> Job | None:
        """Under the lock: which of `waiting` (in arrival order) an engine holding `holding` (its last
        job's affinity) runs next: the first, unless a later one needs no swap and no job ahead of it
        has been passed over GROUP_PASSES times yet."""
        if not waiting:
            return None
        first = waiting[0]
        if holding is None or first.affinity is None or first.affinity == holding:
            return first
        same = next((job for job in waiting if job.affinity == holding), None)
        ahead = waiting[: waiting.index(same)] if same is not None else []
        if same is None or any(job.passed_over >= GROUP_PASSES for job in ahead):
            return first
        for job in ahead:
            job.passed_over += 1
        return same

    def _rejoin(self, job: Job) -> None:
        """On the build lane's thread: `job`'s variant is built; it goes back to the front of the queue
        (it has waited since before everything there), unless it was cancelled meanwhile."""
        with self._cond:
            if job.state != "building" or job not in self._building:
                return
            self._building.remove(job)
            job.state = "queued"
            self._jobs.appendleft(job)
            self._queued()

    # -- finishing ------------------------------------------------------------------------------------
    def _drop_waiting(self) -> None:
        """Stop taking work and cancel what waits (shutdown)."""
        with self._cond:
            self._stopping = True
            dropped = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in dropped:
            self._finish_cancelled(job, "shutdown", WorkerStopped("the server is shutting down"))

    def _account(self, job: Job, outcome: str) -> None:
        """A finished job: its metrics, the Retry-After estimate, then whoever waits for it."""
        if self.metrics:
            self.metrics.jobs.labels(job.kind, outcome).inc()
            self.metrics.job_duration.labels(job.kind).observe(job.run_s)
        if job.kind == "inference" and job.error is None:
            run_s = job.run_s
            self._seconds_per_job = run_s if self._seconds_per_job is None else 0.8 * self._seconds_per_job + 0.2 * run_s
        self._notify(job)

    def _notify(self, job: Job) -> None:
        if job.on_done is None:
            return
        try:
            job.on_done(job)
        except Exception:  # noqa: BLE001
            log.exception("on_done callback of a %s job failed", job.kind)

    def _finish_cancelled(self, job: Job, reason: str, error: BaseException) -> None:
        job.state = "cancelled"
        job.error = error
        if self.metrics:
            self.metrics.jobs.labels(job.kind, f"cancelled_{reason}").inc()
        self._notify(job)
