"""Benchmark runs as a job: the stage benchmark (the CLI's own code, engine/benchmark) runs on the
GPU worker, so it never overlaps an edit; the HTTP side reports its progress and keeps the latest
finished table.

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
from pathlib import Path

from engine.benchmark.report import json_safe, write_results
from engine.benchmark.runner import BenchmarkSettings, run_benchmark

from .queue import Job, JobCancelled, JobFailed

log = logging.getLogger("flux_kontext.service.benchmark")


class BenchmarkCancelled(JobCancelled):
    pass


class BenchmarkJobs:
    def __init__(self, service):
        self.service = service
        self._lock = threading.Lock()
        self.current: dict | None = None  # the queued or running benchmark
        self.latest: dict | None = None  # the latest finished one
        self.last_failure: dict | None = None  # the latest one that failed or was cancelled
        self._job: Job | None = None
        self._cancel = threading.Event()

    # -- reading --------------------------------------------------------------------------------------
    def summary(self) -> dict:
        with self._lock:
            return {
                "running": dict(self.current) if self.current else None,
                "latest": {key: self.latest[key] for key in ("stages", "finished_at", "duration_s")} if self.latest else None,
                "last_failure": dict(self.last_failure) if self.last_failure else None,
            }

    @property
    def running(self) -> dict | None:
        with self._lock:
            return dict(self.current) if self.current else None

    # -- starting and stopping ------------------------------------------------------------------------
    def start(self, stages: list[int]) -> dict:
        """Queue a run (raises QueueFull like any job); returns the progress record."""
        settings = self.service.settings
        size = settings.benchmark_size
        repeats = settings.benchmark_repeats
        if repeats is None:
            repeats = 3 if self.service.engine.env.has_cuda else 1
        bench = BenchmarkSettings(stages=stages, width=size, height=size, repeats=repeats, warmup=settings.benchmark_warmup)
        with self._lock:
            if self.current is not None:
                return dict(self.current)
            self._cancel.clear()
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
            self._job = self.service.worker.submit("benchmark", lambda: self._run(bench), on_done=self._finished)
        except BaseException:
            with self._lock:
                self.current = None
            raise
        return dict(record)

    def cancel(self) -> dict | None:
        with self._lock:
            if self.current is None:
                return None
            self._cancel.set()
            job = self._job
        if job is not None and self.service.worker.cancel(job, "requested"):
            self._finished_cancelled("cancelled before it started")
            return {"status": "cancelled"}
        return {"status": "cancelling", "message": "the run stops after the current edit"}

    # -- on the worker thread -------------------------------------------------------------------------
    def _run(self, bench: BenchmarkSettings):
        engine = self.service.engine
        with self._lock:
            self.current.update(status="running", started_at=time.time(), message="starting")
        report = run_benchmark(engine, bench, on_progress=self._progress)
        directory = self.service.settings.benchmark_results_dir
        if directory:
            write_results(report, Path(directory))
        return report

    def _progress(self, message: str, fraction: float) -> None:
        """After every benchmark edit, on the worker thread: report, stop if cancelled, and let the
        user requests that arrived meanwhile run before the next edit."""
        with self._lock:
            if self.current is not None:
                self.current.update(message=message, fraction=round(fraction, 4))
        if self._cancel.is_set():
            raise BenchmarkCancelled(message)
        served = self.service.worker.run_waiting(exclude_kinds=("benchmark",))
        if served:
            log.info("benchmark paused after %s for %d user request(s)", message, served)

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
            report = job.result
            self.latest = {
                "stages": stages,
                "finished_at": time.time(),
                "duration_s": round(job.run_s, 2),
                "report": json_safe(report.as_dict()),
                "markdown": report.markdown(),
            }

    def _finished_cancelled(self, why: str) -> None:
        with self._lock:
            stages = self.current["stages"] if self.current else []
            self.current, self._job = None, None
            self.last_failure = {"status": "cancelled", "stages": stages, "error": why, "at": time.time()}
