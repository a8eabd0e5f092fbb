"""The single GPU worker: one thread runs every engine call (load, warm-up, edits, benchmarks) in
arrival order, from a bounded queue.

    worker = GpuWorker(capacity=16, metrics=metrics); worker.start()
    result = await worker.run("inference", lambda: engine.edit(request, config), deadline=..., is_disconnected=...)

Why one thread: the GPU, the built variants and CUDA graphs are shared state, and edits batch
nothing, so running two at once only adds memory and contention. The asyncio side never blocks: it
awaits a future that the worker resolves. A job is cancellable only while it waits (the engine has
no safe point to stop a running edit), so a client that disconnects or times out while queued costs
the GPU nothing; an edit that is already running is stopped at its next step boundary when its
deadline passes (the engine's `should_stop`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch

from engine.engine import EditCancelled

from .metrics import ServiceMetrics

log = logging.getLogger("flux_kontext.service.queue")


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} jobs are already waiting")
        self.waiting = waiting
        self.retry_after = retry_after


class WorkerStopped(Exception):
    """The worker is shutting down and takes no more work."""


class JobTimeout(Exception):
    def __init__(self, waited_s: float, was_running: bool):
        super().__init__(f"no result after {waited_s:.1f} s")
        self.waited_s = waited_s
        self.was_running = was_running


class ClientGone(Exception):
    """The client disconnected while its job was waiting; the job was dropped."""


class GpuOutOfMemory(Exception):
    """A job ran out of GPU memory; the memory has been released and the worker keeps serving."""


class JobCancelled(Exception):
    """Raised by a job to stop itself on request (a cancelled benchmark); not an error."""


class JobRefused(Exception):
    """Raised by a job that refuses its input (a client error found on the worker, e.g. a bad adapter
    file): the caller gets `reason` back as it was raised, and nothing is logged as a failure."""

    def __init__(self, reason: BaseException):
        super().__init__(str(reason))
        self.reason = reason


class JobFailed(Exception):
    """A job raised something unexpected (logged with its traceback by the worker)."""

    def __init__(self, kind: str, error: BaseException):
        super().__init__(f"{kind} job failed: {type(error).__name__}")
        self.original = error


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # CPU allocator failures and some CUDA paths raise a plain RuntimeError
    return isinstance(error, RuntimeError) and ("out of memory" in str(error).lower() or "can't allocate memory" in str(error).lower())


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(eq=False)
class Job:
    kind: str
    fn: Callable[[], Any]
    on_done: Callable[["Job"], None] | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    state: str = "queued"  # queued -> running -> done | failed; queued -> cancelled
    result: Any = None
    error: BaseException | None = None

    @property
    def queue_s(self) -> float:
        return (self.started_at or time.monotonic()) - self.enqueued_at

    @property
    def run_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started_at if self.started_at else 0.0


class GpuWorker:
    def __init__(self, capacity: int, metrics: ServiceMetrics | None = None, poll_s: float = 0.2):
        self.capacity = capacity
        self.metrics = metrics
        self.poll_s = poll_s
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_job: float | None = None  # moving average of user jobs, for Retry-After
        self.completed = 0

    # -- state --------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._jobs)

    @property
    def running(self) -> Job | None:
        return self._running

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and self._running is None

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times the average job."""
        per_job = self._seconds_per_job or 1.0
        return int(min(300, max(1, math.ceil(per_job * (self.waiting + 1)))))

    def snapshot(self) -> dict:
        running = self._running
        return {
            "capacity": self.capacity,
            "waiting": self.waiting,
            "running": running.kind if running else None,
            "running_for_s": round(running.run_s, 3) if running else None,
            "completed": self.completed,
            "seconds_per_job": round(self._seconds_per_job, 3) if self._seconds_per_job else None,
        }

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job, drop the waiting ones, end the thread."""
        with self._cond:
            self._stopping = True
            dropped = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in dropped:
            self._finish_cancelled(job, "shutdown", WorkerStopped("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- submitting -----------------------------------------------------------------------------------
    def submit(self, kind: str, fn: Callable[[], Any], on_done: Callable[[Job], None] | None = None, system: bool = False) -> Job:
        """Queue a job; raises QueueFull (user jobs only: `system` jobs such as loading skip the bound)."""
        job = Job(kind, fn, on_done)
        with self._cond:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            if not system and len(self._jobs) >= self.capacity:
                if self.metrics:
                    self.metrics.jobs.labels(kind, "rejected_queue_full").inc()
                raise QueueFull(len(self._jobs), self.retry_after())
            self._jobs.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str) -> bool:
        """Drop a job that is still waiting (True); a running or finished job cannot be (False)."""
        with self._cond:
            if job.state != "queued":
                return False
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            job.state = "cancelled"
        if self.metrics:
            self.metrics.jobs.labels(job.kind, f"cancelled_{reason}").inc()
        return True

    async def run(
        self,
        kind: str,
        fn: Callable[[], Any],
        deadline: float,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[Any, Job]:
        """Queue `fn`, wait for it without blocking the event loop, and return (result, job).

        Raises QueueFull, WorkerStopped, JobTimeout (deadline, a monotonic time, passed), ClientGone
        (dropped while waiting), GpuOutOfMemory, JobFailed, or the reason of a JobRefused.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def resolve(finished: Job) -> None:
            try:
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(finished))
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        job = self.submit(kind, fn, resolve)
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

    # -- the worker thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:  # stopping and nothing left
                    return
                job = self._jobs.popleft()
                self._begin(job)
            self._run(job, outer=None)

    def run_waiting(self, exclude_kinds: tuple[str, ...] = ()) -> int:
        """Called by a long job on the worker thread, between two of its pieces of work: run the
        jobs waiting now (except those of `exclude_kinds`) before going on; returns how many ran."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("run_waiting belongs to the worker thread")
        outer, served = self._running, 0
        while True:
            with self._cond:
                job = next((waiting for waiting in self._jobs if waiting.kind not in exclude_kinds), None)
                if job is None or self._stopping:
                    return served
                self._jobs.remove(job)
                self._begin(job)
            self._run(job, outer)
            served += 1

    def _begin(self, job: Job) -> None:
        """Under the lock: `job` leaves the queue and runs."""
        job.state = "running"
        job.started_at = time.monotonic()
        self._running = job

    def _run(self, job: Job, outer: Job | None) -> None:
        """Run a job that `_begin` started, record it, then hand the worker back to `outer`."""
        if self.metrics:
            self.metrics.queue_wait.labels(job.kind).observe(job.queue_s)
        outcome = self._execute(job)
        with self._cond:
            job.finished_at = time.monotonic()
            job.state = "done" if job.error is None else "failed"
            self._running = outer
            self.completed += 1
        self._account(job, outcome)

    def _account(self, job: Job, outcome: str) -> None:
        """A finished job: its metrics, the Retry-After estimate, then whoever waits for it."""
        if self.metrics:
            self.metrics.jobs.labels(job.kind, outcome).inc()
            self.metrics.job_duration.labels(job.kind).observe(job.run_s)
        if job.kind in ("inference", "edit") and job.error is None:
            run_s = job.run_s
            self._seconds_per_job = run_s if self._seconds_per_job is None else 0.8 * self._seconds_per_job + 0.2 * run_s
        self._notify(job)

    def _execute(self, job: Job) -> str:
        try:
            job.result = job.fn()
            return "ok"
        except JobCancelled as cancelled:
            job.error = cancelled
            return "cancelled_requested"
        except JobRefused as refused:
            job.error = refused.reason
            return "refused"
        except EditCancelled as stopped:  # the edit's deadline passed while it ran: it stopped early
            job.error = stopped
            return "cancelled_timeout"
        except BaseException as error:  # noqa: BLE001 - the worker must survive anything a job does
            if not is_out_of_memory(error):
                log.error("%s job failed", job.kind, exc_info=error)
                job.error = error if isinstance(error, (GpuOutOfMemory, JobFailed)) else JobFailed(job.kind, error)
                return "failed"
            message = (str(error).splitlines() or ["out of memory"])[0][:300]
        # Out of memory. The exception and its traceback, which pins the failed step's tensors, are
        # released by now, so the cache can really be emptied.
        job.error = GpuOutOfMemory(message)
        log.warning("%s job ran out of memory (%s); released cached memory, serving on", job.kind, message)
        release_memory()
        return "out_of_memory"

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
