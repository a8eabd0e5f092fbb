"""GET /benchmark as a job: the stage benchmark (the CLI's own code) runs on the GPU worker, in the
same queue as edits, so it never overlaps a request; the HTTP side reports its progress and keeps
the latest finished table.

    GET /benchmark            -> 200 with the latest table for these stages, or 202 with progress
                                 (starting a run when none is running and none has finished)
    GET /benchmark?force=true -> start a new run even when a table exists
    DELETE /benchmark         -> cancel the run (between two edits; compilation is not interruptible)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from benchmarks.stage_benchmark import BenchmarkSettings, run_benchmark, write_results

from .queue import Job, JobCancelled, JobFailed

log = logging.getLogger("flux_kontext.service.benchmark")


def json_safe(value):
    """inf/nan (stage 0's PSNR against itself is infinite) become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


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

    def latest_for(self, stages: list[int]) -> dict | None:
        with self._lock:
            return self.latest if self.latest and self.latest["stages"] == stages else None

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
            record = {"status": "queued", "stages": stages, "message": "waiting for the GPU worker", "fraction": 0.0, "queued_at": time.time(), "started_at": None}
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
        self.service.refresh_variants()
        directory = self.service.settings.benchmark_results_dir
        if directory:
            write_results(report, Path(directory))
        return report

    def _progress(self, message: str, fraction: float) -> None:
        with self._lock:
            if self.current is not None:
                self.current.update(message=message, fraction=round(fraction, 4))
        if self._cancel.is_set():
            raise BenchmarkCancelled(message)

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
