"""Benchmark runs as a job: the stage benchmark (RunBenchmark, service/engine_calls.py: the CLI's own
code) runs on the GPU worker, or on one worker process of `serve --gpus`, so it never overlaps an
edit on its engine; the HTTP side reports its progress and keeps the latest finished table.

A run takes minutes, so it yields: after each of its edits it lets every user request that queued
up meanwhile run first, so no request waits longer than one benchmark edit.

    POST /benchmark    -> start a run (when the server's policy allows clients to)
    GET /benchmark     -> 200 with the latest table, or 202 with progress
    DELETE /benchmark  -> cancel the run (between two edits; compilation is not interruptible)
"""

from __future__ import annotations

import logging
import threading
import time

from engine.benchmark.runner import BenchmarkSettings

from .engine_calls import BenchmarkCancelled, RunBenchmark
from .jobs import Job, JobFailed

log = logging.getLogger("flux_kontext.service.benchmark")


class BenchmarkJobs:
    def __init__(self, service):
        self.service = service
        self._lock = threading.Lock()
        self.current: dict | None = None  # the queued or running benchmark
        self.latest: dict | None = None  # the latest finished one
        self.last_failure: dict | None = None  # the latest one that failed or was cancelled
        self._job: Job | None = None

    # -- reading --------------------------------------------------------------------------------------
    def summary(self) -> dict:
        with self._lock:
            return {
                "running": self._record(),
                "latest": {key: self.latest[key] for key in ("stages", "finished_at", "duration_s")} if self.latest else None,
                "last_failure": dict(self.last_failure) if self.last_failure else None,
            }

    @property
    def running(self) -> dict | None:
        with self._lock:
            return self._record()

    def _record(self) -> dict | None:
        """Under the lock: the progress record, "running" from the moment the worker started the job."""
        if self.current is None:
            return None
        record = dict(self.current)
        if record["status"] == "queued" and self._job is not None and self._job.state == "running":
            record.update(status="running", message="starting")
        return record

    # -- starting and stopping ------------------------------------------------------------------------
    def start(self, stages: list[int]) -> dict:
        """Queue a run (raises QueueFull like any job); returns the progress record."""
        settings = self.service.settings
        size = settings.benchmark_size
        repeats = settings.benchmark_repeats
        if repeats is None:
            repeats = 3 if self.service.model.has_cuda else 1
        bench = BenchmarkSettings(stages=stages, width=size, height=size, repeats=repeats, warmup=settings.benchmark_warmup)
        with self._lock:
            if self.current is not None:
                return dict(self.current)
            record = {
                "status": "queued",
                "stages": stages,
                "message": "waiting for the GPU worker",
                "fraction": 0.0,
                "queued_at": time.time(),
                "started_at": None,
            }
            self.current = record
        try:
            call = RunBenchmark(bench, settings.benchmark_results_dir)
            self._job = self.service.worker.submit(call, on_done=self._finished, on_progress=self._progress)
        except BaseException:
            with self._lock:
                self.current = None
            raise
        return dict(record)

    def cancel(self) -> dict | None:
        with self._lock:
            if self.current is None:
                return None
            job = self._job
        if job is not None and self.service.worker.cancel(job, "requested"):
            self._finished_cancelled("cancelled before it started")
            return {"status": "cancelled"}
        if job is not None:
            self.service.worker.stop_job(job)
        return {"status": "cancelling", "message": "the run stops after the current edit"}

    # -- from the worker --------------------------------------------------------------------------------
    def _progress(self, message: str, fraction: float) -> None:
        """After every benchmark edit: what the run reports (it stops itself when cancelled)."""
        with self._lock:
            if self.current is not None:
                if self.current["status"] == "queued":
                    self.current.update(status="running", started_at=time.time())
                self.current.update(message=message, fraction=round(fraction, 4))

    def _finished(self, job: Job) -> None:
        error = job.error.original if isinstance(job.error, JobFailed) else job.error
        if isinstance(error, BenchmarkCancelled):
            self._finished_cancelled(f"cancelled after {error}")
            return
        with self._lock:
            current, self.current, self._job = self.current, None, None
            stages = current["stages"] if current else []
            if error is not None:
                self.last_failure = {"status": "failed", "stages": stages, "error": f"{type(error).__name__}: {error}", "at": time.time()}
                return
            self.latest = {"stages": stages, "finished_at": time.time(), "duration_s": round(job.run_s, 2), **job.result}

    def _finished_cancelled(self, why: str) -> None:
        with self._lock:
            stages = self.current["stages"] if self.current else []
            self.current, self._job = None, None
            self.last_failure = {"status": "cancelled", "stages": stages, "error": why, "at": time.time()}
