"""A job: one engine call (service/engine_calls.py) on its way through a worker (service/worker.py),
the ways it can end, and `execute`, the one place that runs a call on an engine and names its
outcome, used by the in-process worker and by every worker process alike.

While it runs, a call sees its job through a `JobContext`: it may report progress, ask whether it
should stop (a cancelled benchmark), and let the jobs that queued up meanwhile run first (a long
job between two of its pieces), wherever the worker runs.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from engine.requests import EditCancelled

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


class WorkerDied(Exception):
    """The worker process running this job died; the job is not retried (it may have caused it)."""


class BuildLimit(Exception):
    """The client has caused as many variant builds as it may in the window (a 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, retry_after)  # both in args: the exception pickles across processes
        self.message, self.retry_after = message, retry_after

    def __str__(self) -> str:
        return self.message


class JobContext(Protocol):
    """What a running call may ask of the worker that runs it."""

    def progress(self, message: str, fraction: float) -> None: ...

    def should_stop(self) -> bool: ...

    def serve_waiting(self) -> int: ...


class Unattended:
    """The context of a call run outside any worker (the command line, tests): nobody listens."""

    def progress(self, message: str, fraction: float) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def serve_waiting(self) -> int:
        return 0


@dataclass(eq=False)
class Job:
    call: Any  # an engine call (service/engine_calls.py)
    on_done: Callable[["Job"], None] | None = None
    on_progress: Callable[[str, float], None] | None = None
    target: int | None = None  # a worker process's index: this job runs there (run_everywhere)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    state: str = "queued"  # queued [-> building -> queued] -> running -> done | failed; queued | building -> cancelled
    result: Any = None
    error: BaseException | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)  # asked to stop at its next safe point
    passed_over: int = 0  # later jobs that ran before it to keep an engine's adapter set (service/worker.py)

    @property
    def kind(self) -> str:
        return self.call.kind

    @property
    def deadline(self) -> float:
        return getattr(self.call, "deadline", float("inf"))

    @property
    def affinity(self):
        """What an engine must hold to run this job without a swap (merge mode: the adapter set); None: anything."""
        return getattr(self.call, "affinity", None)

    @property
    def queue_s(self) -> float:
        return (self.started_at or time.monotonic()) - self.enqueued_at

    @property
    def run_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started_at if self.started_at else 0.0


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # CPU allocator failures and some CUDA paths raise a plain RuntimeError
    return isinstance(error, RuntimeError) and ("out of memory" in str(error).lower() or "can't allocate memory" in str(error).lower())


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Outcome:
    name: str  # ok, refused, cancelled_requested, cancelled_timeout, failed, out_of_memory (a metrics label)
    result: Any = None
    error: BaseException | None = None  # what the caller gets raised (JobFailed for "failed")


def execute(call, engine, context: JobContext) -> Outcome:
    """Run `call` on `engine`. The worker survives anything the call does: an out-of-memory error
    frees the cached memory once the failed step's tensors are gone, a bug is logged with its
    traceback and reported as JobFailed, a refusal travels back as the client error it is."""
    try:
        return Outcome("ok", call.run(engine, context))
    except JobCancelled as cancelled:
        return Outcome("cancelled_requested", error=cancelled)
    except JobRefused as refused:
        return Outcome("refused", error=refused.reason)
    except EditCancelled as stopped:  # the edit's deadline passed while it ran: it stopped early
        return Outcome("cancelled_timeout", error=stopped)
    except BaseException as error:  # noqa: BLE001 - the worker must survive anything a job does
        if not is_out_of_memory(error):
            log.error("%s job failed", call.kind, exc_info=error)
            return Outcome("failed", error=error if isinstance(error, (GpuOutOfMemory, JobFailed)) else JobFailed(call.kind, error))
        message = (str(error).splitlines() or ["out of memory"])[0][:300]
    # Out of the except block: the exception's traceback no longer pins the failed step's tensors.
    log.warning("%s job ran out of memory (%s); released cached memory, serving on", call.kind, message)
    release_memory()
    return Outcome("out_of_memory", error=GpuOutOfMemory(message))
