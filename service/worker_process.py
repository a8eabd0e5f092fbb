"""The worker side of `serve --gpus`: one spawned process per GPU, with its own engine.

    front -> worker  ("job", id, call) | ("cancel", id) | ("halt", id) | ("ask", id, call) | ("stop",)
    worker -> front  ("ready", description, startup, status) | ("load_failed", message) | ("warmed", warmup status, report)
                     | ("started", id)
                     | ("building", id) | ("progress", id, message, fraction) | ("skipped", id)
                     | ("answer", id, ok, value) | ("done", id, result, status) | ("failed", id, outcome, error, status)

The process pins its GPU (CUDA_VISIBLE_DEVICES) before anything can initialise CUDA, starts its
engine as the in-process worker does (service/startup.py), says "ready", then runs the calls it is
sent one at a time with the same `execute` (service/jobs.py), and warms the shapes left one at a time
whenever none is buffered ("warmed" after each). It acks "started" before running a
job, so that the front knows which jobs may be given to another worker if this one dies (those it
never started) and which may not (the one it was running). A reader thread takes messages as they
arrive: a cancel for a buffered job is seen before that job starts, a halt reaches a running
benchmark, and an ask (a read-only call) is answered at once. A job past its deadline is skipped:
its client has had its 504 already. A long job that yields (a benchmark) runs the jobs buffered here
between its own pieces of work; the front keeps sending while it runs (service/worker_pool.py). A
job whose variant is not ready waits for it on this process's build lane (service/builds.py, as in
the in-process worker): "building" tells the front that its slot is free meanwhile.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable

log = logging.getLogger("flux_kontext.service.worker")

NOISY_LOGGERS = ("httpx", "urllib3", "PIL", "torch._dynamo", "torch._inductor", "transformers", "diffusers", "torchao")


def worker_main(index: int, gpu: str | None, loader: Callable[[str], Any], settings, inbox, outbox, cpu_threads: int | None) -> None:
    """Entry of a spawned worker process. `gpu` is the GPU id it owns (None: a CPU worker)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA is initialised: the worker sees its GPU as cuda:0
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    from .engine_calls import DescribeEngine, EngineStatus
    from .jobs import Unattended
    from .startup import start_engine

    if gpu is None and cpu_threads:
        torch.set_num_threads(cpu_threads)  # CPU workers share the cores instead of each taking all
    try:
        engine, startup, warmups = start_engine(lambda: loader("cuda:0" if gpu is not None else "cpu"), settings)
        description = DescribeEngine().run(engine, Unattended())
        outbox.send(("ready", description, startup, EngineStatus().run(engine, Unattended())))
    except BaseException as error:  # noqa: BLE001 - reported to the front, which does not restart a worker that cannot load
        log.error("worker %d could not load or warm up its engine", index, exc_info=error)
        outbox.send(("load_failed", f"{type(error).__name__}: {error}"))
        return
    _Server(engine, inbox, outbox, settings, warmups).serve()


class _Server:
    """The engine's side of the pipes: a reader thread that files messages, and the main thread that runs jobs."""

    def __init__(self, engine, inbox, outbox, settings, warmups):
        from .builds import BuildLane

        self.engine, self.inbox, self.outbox, self.warmups = engine, inbox, outbox, warmups
        self.lane = BuildLane(engine, settings, self._rejoin)
        self.jobs: deque = deque()  # (id, call), in the order the front sent them
        self.cond = threading.Condition()
        self.cancelled: set[int] = set()
        self.halted: set[int] = set()
        self.stopping = False
        self.send_lock = threading.Lock()  # the reader thread answers asks while the main thread reports jobs
        self.quiet_s = settings.warm_after_idle_s
        self.last_job_end = float("-inf")  # time.monotonic(): idle work starts only after quiet_s without a job

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.outbox.send(message)

    def serve(self) -> None:
        threading.Thread(target=self._read, name="worker-inbox", daemon=True).start()
        self._report_warmups()
        while True:
            with self.cond:
                while not self.jobs and not self.stopping and (wait := self.warmups.wait_s(self.last_job_end, self.quiet_s)) != 0.0:
                    self.cond.wait(wait)  # a job notifies; else the quiet time ends
                if self.stopping and not self.jobs:
                    return
                job = self.jobs.popleft() if self.jobs else None
            if job is None:  # nothing buffered: one piece of idle work, on this thread (a shape's CUDA graphs are this thread's)
                self._warm_one()
            else:
                self.run(*job)
                self.last_job_end = time.monotonic()

    def _warm_one(self) -> None:
        try:
            self.warmups.do_one()
        except Exception:  # noqa: BLE001 - Warmup reports a failing shape itself; this is anything else
            log.exception("background warm-up failed; the shapes left compile on first use")
            self.warmups.warmups.clear()
        self._report_warmups()

    def _report_warmups(self) -> None:
        self.send(("warmed", self.warmups.status(), self.warmups.report()))

    def _read(self) -> None:
        """Take messages as they come, so that the front never blocks sending while a job runs."""
        while True:
            try:
                message = self.inbox.recv()
            except (EOFError, OSError):  # the front is gone
                message = ("stop",)
            kind = message[0]
            with self.cond:
                if kind == "stop":
                    self.stopping = True
                    self.cond.notify_all()
                    return
                if kind == "job":
                    self.jobs.append(message[1:])
                    self.cond.notify()
                elif kind == "cancel":
                    self.cancelled.add(message[1])
                elif kind == "halt":
                    self.halted.add(message[1])
            if kind == "ask":
                self._answer(message[1], message[2])

    def _answer(self, ask_id: int, call) -> None:
        from .jobs import Unattended

        try:
            self.send(("answer", ask_id, True, call.run(self.engine, Unattended())))
        except Exception as error:  # noqa: BLE001 - a read that failed: the front raises it for its caller
            self.send(("answer", ask_id, False, _portable(error)))

    def _rejoin(self, token) -> None:
        """On the build lane's thread: the job's variant is built; it runs next."""
        with self.cond:
            self.jobs.appendleft(token)
            self.cond.notify()

    def run(self, job_id: int, call) -> None:
        from .engine_calls import EngineStatus
        from .jobs import BuildLimit, Outcome, Unattended, execute

        if job_id in self.cancelled or time.monotonic() > getattr(call, "deadline", float("inf")):
            self.cancelled.discard(job_id)
            self.send(("skipped", job_id))
            return
        try:
            if self.lane.divert((job_id, call), call):
                self.send(("building", job_id))
                return
        except BuildLimit as limit:
            outcome = Outcome("refused", error=limit)
        else:
            self.send(("started", job_id))
            outcome = execute(call, self.engine, _Context(self, job_id))
        status = EngineStatus().run(self.engine, Unattended())
        if outcome.name == "ok":
            self.send(("done", job_id, outcome.result, status))
        else:
            self.send(("failed", job_id, outcome.name, _portable(outcome.error), status))

    def run_buffered(self, yielding_id: int) -> int:
        """Between two pieces of a long job: run the jobs the front sent meanwhile; how many ran."""
        served = 0
        while True:
            with self.cond:
                if not self.jobs or self.stopping:
                    return served
                job_id, call = self.jobs.popleft()
            self.run(job_id, call)
            served += 1


class _Context:
    def __init__(self, server: _Server, job_id: int):
        self.server, self.job_id = server, job_id

    def progress(self, message: str, fraction: float) -> None:
        self.server.send(("progress", self.job_id, message, fraction))

    def should_stop(self) -> bool:
        return self.job_id in self.server.halted

    def serve_waiting(self) -> int:
        return self.server.run_buffered(self.job_id)


def _portable(error: BaseException) -> tuple[str, str, bytes | None]:
    """An exception as (type name, message, pickle or None): the front rebuilds it when it can."""
    original = getattr(error, "original", None)  # JobFailed: the front rebuilds the wrapper itself
    error = original if original is not None else error
    try:
        blob = pickle.dumps(error)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt (custom __init__ signatures)
    except Exception:  # noqa: BLE001
        blob = None
    text = str(error) or "".join(traceback.format_exception_only(type(error), error)).strip()
    return type(error).__name__, text, blob
