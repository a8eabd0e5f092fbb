"""The in-process GPU worker: one thread loads the engine, warms its first shape, then runs every call
in arrival order, from the bounded queue of service/worker.py, and warms the other shapes one at a
time once nothing has been asked for a moment (--warm-after-idle-s; so a request waits behind one
shape's warm-up at most, and a client's back-to-back requests behind none).

    worker = GpuWorker(capacity=16, loader=lambda: KontextEngine.load("tiny"), settings=settings); worker.start()
    result, job = await worker.run(EditCall(request, config, deadline), deadline, is_disconnected)

Why one thread: the GPU, the built variants and CUDA graphs are shared state, and edits batch
nothing, so running two at once only adds memory and contention. Read-only calls (`ask`) run on the
caller's thread beside it: the engine's reports are safe to read while it works.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import torch
from starlette.concurrency import run_in_threadpool

from .builds import BuildLane
from .engine_calls import DescribeEngine, EngineStatus
from .jobs import BuildLimit, Job, Outcome, Unattended, execute
from .metrics import ServiceMetrics
from .startup import start_engine
from .worker import Worker

log = logging.getLogger("flux_kontext.service.queue")


class GpuWorker(Worker):
    def __init__(
        self,
        capacity: int,
        metrics: ServiceMetrics | None = None,
        poll_s: float = 0.2,
        loader: Callable[[], Any] | None = None,
        settings=None,
        engine=None,
    ):
        super().__init__(capacity, metrics, poll_s)
        self.loader, self.settings, self.engine = loader, settings, engine
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self.lane: BuildLane | None = None  # variant builds beside this thread, once the engine is up
        self._holding = None  # the affinity of the last job run: what the engine holds (merge mode: an adapter set)
        self.warmups = None  # shapes left to warm after /ready (service/startup.py: BackgroundWarmups)
        self._last_job_end = float("-inf")  # time.monotonic(): idle work starts only after settings.warm_after_idle_s of quiet

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="gpu-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job, drop the waiting ones, end the thread."""
        self._drop_waiting()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self.engine, startup, self.warmups = start_engine(
                self.loader, self.settings, self.engine, lambda phase: self.on_event(phase, None)
            )
        except Exception as error:  # noqa: BLE001 - reported on /health and /ready, and ends the server
            self.on_event("failed", error)
            return
        self.description = DescribeEngine().run(self.engine, Unattended())
        self.lane = BuildLane(self.engine, self.settings, self._rejoin)
        self.on_event("ready", startup)
        self._serve()

    # -- the engine -----------------------------------------------------------------------------------
    @property
    def ready_engines(self) -> int:
        return 1 if self.description is not None and not self._stopping else 0

    def engine_status(self) -> dict:
        return EngineStatus().run(self.engine, Unattended()) if self.description is not None else {}

    def gpu_memory_bytes(self) -> dict[str, int]:
        if self.description is None or not self.description.has_cuda:
            return {}
        index = self.engine.env.gpu.index
        free, total = torch.cuda.mem_get_info(index)
        allocated, reserved = torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index)
        return {"allocated": allocated, "reserved": reserved, "free": free, "total": total}

    async def ask(self, call) -> Any:
        return await run_in_threadpool(call.run, self.engine, Unattended())

    def stop_job(self, job: Job) -> None:
        job.stop_requested.set()

    # -- the worker thread ----------------------------------------------------------------------------
    @property
    def running(self) -> list[Job]:
        job = self._running
        return [job] if job is not None else []

    def warmup_status(self) -> dict | None:
        return self.warmups.status() if self.warmups is not None else None

    def warmup_report(self) -> dict:
        return self.warmups.report() if self.warmups is not None else {}

    def _idle_wait_s(self) -> float | None:
        quiet_s = self.settings.warm_after_idle_s if self.settings is not None else 0.0
        return self.warmups.wait_s(self._last_job_end, quiet_s)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping and (wait := self._idle_wait_s()) != 0.0:
                    self._cond.wait(wait)  # a new job notifies; otherwise the quiet time ends
                if self._stopping and not self._jobs:
                    return
                warm = not self._jobs
            if warm:  # nothing waits: one piece of idle work, on this thread (a shape's CUDA graphs are this thread's)
                self._warm_one()
                continue
            job = self._take(lambda waiting: self._pick(list(waiting), self._holding))
            if job is not None:
                self._run(job, outer=None)

    def _warm_one(self) -> None:
        try:
            self.warmups.do_one()
        except Exception:  # noqa: BLE001 - Warmup reports a failing shape itself; this is anything else
            log.exception("background warm-up failed; the shapes left compile on first use")
            self.warmups.warmups.clear()
        self._holding = None  # a warm-up with an adapter in merge mode changed what the engine holds

    def run_waiting(self, yielding: Job) -> int:
        """Called by a long job on the worker thread between two of its pieces of work: run the jobs
        waiting now (not another long one of the same kind) before going on; returns how many ran."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("run_waiting belongs to the worker thread")
        served = 0
        while not self._stopping:
            with self._cond:
                if not any(waiting.kind != yielding.kind for waiting in self._jobs):
                    return served
            job = self._take(
                lambda waiting: self._pick([job for job in waiting if job.kind != yielding.kind], self._holding), outer=yielding
            )
            if job is not None:
                self._run(job, outer=yielding)
                served += 1
        return served

    def _take(self, choose, outer: Job | None = None) -> Job | None:
        """The next job to run, taken from the queue and begun, as `choose(queue)` picks it; None when
        the pick went to wait for its variant's build instead (or was refused: its client may cause
        no more builds)."""
        with self._cond:
            job = choose(self._jobs)
            if job is None:
                return None
            self._jobs.remove(job)
            try:
                if self.lane is not None and self.lane.divert(job, job.call):
                    job.state = "building"
                    self._building.append(job)
                    return None
            except BuildLimit as limit:
                refused = limit
            else:
                self._begin(job)
                return job
        self._finish(job, Outcome("refused", error=refused), outer)
        return None

    def _begin(self, job: Job) -> None:
        """Under the lock: `job` leaves the queue and runs."""
        job.state = "running"
        job.started_at = time.monotonic()
        self._running = job
        if job.affinity is not None:
            self._holding = job.affinity

    def _run(self, job: Job, outer: Job | None) -> None:
        """Run a job that `_begin` started, record it, then hand the worker back to `outer`."""
        if self.metrics:
            self.metrics.queue_wait.labels(job.kind).observe(job.queue_s)
        self._finish(job, execute(job.call, self.engine, _Context(self, job)), outer)

    def _finish(self, job: Job, outcome: Outcome, outer: Job | None) -> None:
        with self._cond:
            job.result, job.error = outcome.result, outcome.error
            job.finished_at = self._last_job_end = time.monotonic()
            job.state = "done" if job.error is None else "failed"
            self._running = outer
            self.completed += 1
        self._account(job, outcome.name)


class _Context:
    """A job's view of the in-process worker while it runs."""

    def __init__(self, worker: GpuWorker, job: Job):
        self.worker, self.job = worker, job

    def progress(self, message: str, fraction: float) -> None:
        if self.job.on_progress is not None:
            self.job.on_progress(message, fraction)

    def should_stop(self) -> bool:
        return self.job.stop_requested.is_set()

    def serve_waiting(self) -> int:
        return self.worker.run_waiting(self.job)
