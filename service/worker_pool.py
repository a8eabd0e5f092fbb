"""`serve --gpus`: one worker process per GPU behind the one HTTP front and its bounded queue.

    pool = WorkerPool(["0", "1"], loader, settings, capacity=16, metrics=metrics); pool.start()
    result, job = await pool.run(EditCall(request, config, deadline), deadline, is_disconnected)

It is a Worker (service/worker.py) like the in-process one: the same calls, the same queue, so the
service has the same routes in both modes. Calls that change every engine (LoRA loads and unloads)
run on every worker (`run_everywhere`), and are run again on a worker that comes back after a
restart; read-only calls (`ask`) are answered by a worker's reader thread at once.

Why processes, and why not a process pool: one engine per GPU needs one process per GPU (the
variants, compiled graphs and CUDA graphs are per-process state), and concurrent.futures'
ProcessPoolExecutor marks the whole pool broken when one worker dies, failing every queued job.
Here each worker is a spawned torch.multiprocessing process (never forked: a forked CUDA context is
unusable) with two one-way pipes; one dispatcher thread waits on every worker's pipe and process
sentinel at once, so a death is seen at once, and it is the only writer to the pipes. Jobs wait in
the front's queue and go to the least loaded ready worker with a free slot (`slots`: 1 by default,
the edit running; a second slot hides the hand-off at the cost of a job waiting behind one worker
while another may free up first). A worker running a job that yields (a benchmark) keeps a slot
free: it runs what it is sent between the benchmark's edits.

When a worker dies: the job it had acked as started fails with WorkerDied (never retried: it may be
what killed the worker, and it may have half run), the jobs it had been sent but had not started go
back to the front of the queue, in order, and the worker is restarted with exponential backoff,
getting work again only once it has loaded and warmed its engine. A worker whose engine fails to
load is not restarted (the error is the user's to fix: /health says it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from multiprocessing.connection import wait as wait_for
from typing import Any, Callable

import torch.multiprocessing

from .jobs import Job, JobTimeout, QueueFull, WorkerDied
from .pool_members import WorkerMetrics, WorkerProcess, rebuild_error
from .worker import Worker, waiter
from .worker_process import worker_main

log = logging.getLogger("flux_kontext.service.workers")

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # before restart 1, 2, ... (the last repeats)
ASK_TIMEOUT_S = 30.0  # a read-only call answers in milliseconds; a worker that does not is stuck or dying
EVERY_ENGINE = ("lora_load", "lora_unload")  # calls that change every engine: run again on a restarted worker


class WorkerPool(Worker):
    def __init__(
        self,
        gpus: list[str | None],
        loader: Callable[[str], Any],
        settings,
        capacity: int,
        metrics=None,
        slots: int = 1,
        max_restarts: int = 5,
    ):
        super().__init__(capacity, metrics)
        if not gpus:
            raise ValueError("a worker pool needs at least one worker")
        self.loader, self.settings, self.slots, self.max_restarts = loader, settings, slots, max_restarts
        self.workers = [WorkerProcess(index, gpu) for index, gpu in enumerate(gpus)]
        cpu_workers = sum(1 for gpu in gpus if gpu is None)
        self.cpu_threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
        self._context = torch.multiprocessing.get_context("spawn")
        self._ids = itertools.count()
        self._outgoing: list[tuple[WorkerProcess, tuple]] = []  # sent by the dispatcher thread, the only writer to the pipes
        self._replay: dict[str, Any] = {}  # adapter name -> the last call that changed it everywhere
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._metrics = WorkerMetrics(metrics, self.workers) if metrics else None

    # -- state ----------------------------------------------------------------------------------------
    @property
    def running(self) -> list[Job]:
        return [job for worker in self.workers for job in worker.running.values()]

    @property
    def ready_engines(self) -> int:
        return sum(1 for worker in self.workers if worker.state == "ready")

    @property
    def building(self) -> int:
        return sum(len(worker.building) for worker in self.workers)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and not any(worker.sent or worker.running or worker.building for worker in self.workers)

    def snapshot(self) -> dict:
        with self._cond:
            return {
                **super().snapshot(),
                "running": len(self.running),
                "running_for_s": None,
                "workers": len(self.workers),
                "workers_ready": self.ready_engines,
                "slots_per_worker": self.slots,
            }

    def workers_report(self) -> list[dict]:
        with self._cond:
            return [worker.report() for worker in self.workers]

    def warmup_status(self) -> dict | None:
        """Every worker's shapes as one (labels name the worker); None until a worker has said."""
        with self._cond:
            statuses = [(worker.index, worker.warmup) for worker in self.workers if worker.warmup is not None]
        if not statuses:
            return None
        merged = {"done": all(status["done"] for _, status in statuses), "warmed": [], "failed": [], "warming": None, "pending": []}
        for index, status in statuses:
            for key in ("warmed", "failed", "pending"):
                merged[key] += [f"worker {index}: {label}" for label in status[key]]
            if status["warming"]:
                merged["warming"] = f"worker {index}: {status['warming']}"
        return merged

    def engine_status(self) -> dict:
        """Each worker's latest status, as one: memory by worker, every worker's variants, the adapters
        of the first ready worker (every worker loads the same ones)."""
        with self._cond:
            workers = [(worker.index, worker.status) for worker in self.workers if worker.status]
            first = next((worker.status for worker in self.workers if worker.state == "ready" and worker.status), {})
        return {
            "memory": {str(index): status.get("memory") for index, status in workers},
            "variants": [{"worker": index, **row} for index, status in workers for row in status.get("variants", [])],
            "loras": first.get("loras"),
            "lora_counts": first.get("lora_counts", (0, 0)),
        }

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        for worker in self.workers:
            self._spawn(worker)
        self._thread = threading.Thread(target=self._loop, name="worker-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Drop the waiting jobs, let the started ones finish (until `timeout`), end the workers."""
        deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
        self._drop_waiting()
        self._wake()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                try:
                    worker.inbox.send(("stop",))
                except OSError:
                    pass
        for worker in self.workers:
            if worker.process is not None:
                worker.process.join(max(0.1, deadline - time.monotonic()))
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join(5)
            worker.state = "stopped"

    # -- running calls ---------------------------------------------------------------------------------
    def _queued(self) -> None:
        self._wake()

    def cancel(self, job: Job, reason: str) -> bool:
        """Drop a job still waiting here, or sent to a worker that has not started it (True)."""
        if super().cancel(job, reason):
            return True
        with self._cond:
            owner = next((worker for worker in self.workers if job in (*worker.sent.values(), *worker.building.values())), None)
            if owner is None or job.state not in ("queued", "building"):
                return False
            job.state = "cancelled"  # keeps its slot until the worker skips it (or, in a race, runs it for nobody)
            held = {**owner.sent, **owner.building}
            job_id = next(key for key, value in held.items() if value is job)
            self._outgoing.append((owner, ("cancel", job_id)))
        if self.metrics:
            self.metrics.jobs.labels(job.kind, f"cancelled_{reason}").inc()
        self._wake()
        return True

    def stop_job(self, job: Job) -> None:
        job.stop_requested.set()
        with self._cond:
            for worker in self.workers:
                for job_id, running in list(worker.running.items()) + list(worker.sent.items()):
                    if running is job:
                        self._outgoing.append((worker, ("halt", job_id)))
        self._wake()

    async def run_everywhere(self, call, deadline: float, is_disconnected=None) -> list:
        with self._cond:
            targets = [worker.index for worker in self.workers if worker.state == "ready"]
            if len(self._jobs) >= self.capacity:
                raise QueueFull(len(self._jobs), self.retry_after())
        waits = []
        for index in targets:  # bound checked once above: every engine gets it, or none does
            future, resolve = waiter()
            waits.append(self._await(self.submit(call, resolve, system=True, target=index), future, deadline, is_disconnected))
        return [result for result, _job in await asyncio.gather(*waits)]

    async def ask(self, call) -> Any:
        future, resolve = waiter()
        with self._cond:
            worker = next((worker for worker in self.workers if worker.state == "ready"), None)
            if worker is None:
                raise WorkerDied("no worker is ready to answer")
            ask_id = next(self._ids)
            worker.asks[ask_id] = resolve
            self._outgoing.append((worker, ("ask", ask_id, call)))
        self._wake()
        ok, value = await asyncio.wait_for(future, ASK_TIMEOUT_S)
        if not ok:
            raise rebuild_error("failed", call.kind, value)
        return value

    # -- the dispatcher thread ------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def _spawn(self, worker: WorkerProcess) -> None:
        inbox_read, inbox_write = self._context.Pipe(duplex=False)
        outbox_read, outbox_write = self._context.Pipe(duplex=False)
        worker.process = self._context.Process(
            target=worker_main,
            args=(worker.index, worker.gpu, self.loader, self.settings, inbox_read, outbox_write, self.cpu_threads),
            name=f"kontext-worker-{worker.index}",
            daemon=True,
        )
        worker.process.start()
        inbox_read.close()  # the child holds these ends now; closing ours makes its death an EOF here
        outbox_write.close()
        worker.inbox, worker.outbox = inbox_write, outbox_read
        worker.pid, worker.state, worker.started_at = worker.process.pid, "starting", time.monotonic()
        log.info("worker %d (%s) started as pid %d", worker.index, worker.gpu if worker.gpu is not None else "cpu", worker.pid)

    def _loop(self) -> None:
        while True:
            with self._cond:
                in_flight = any(worker.sent or worker.running for worker in self.workers)
                if self._stopping and not in_flight and not self._jobs:
                    return
                alive = [worker for worker in self.workers if worker.process is not None]
            waitables = [self._wake_r] + [worker.outbox for worker in alive] + [worker.process.sentinel for worker in alive]
            for ready in wait_for(waitables, timeout=1.0):
                if ready == self._wake_r:
                    while True:
                        try:
                            if not os.read(self._wake_r, 4096):
                                break
                        except BlockingIOError:
                            break
                    continue
                for worker in alive:
                    if worker.process is None:
                        continue
                    if ready is worker.outbox:
                        self._receive(worker)
                    elif ready == worker.process.sentinel:
                        self._receive(worker)  # a result sent just before the death still counts
                        self._on_death(worker)
            self._send_outgoing()
            self._restart_due()
            self._dispatch()

    def _receive(self, worker: WorkerProcess) -> None:
        try:
            while worker.outbox.poll():
                self._handle(worker, worker.outbox.recv())
        except (EOFError, OSError):
            pass  # the process sentinel reports the death

    def _handle(self, worker: WorkerProcess, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            self._on_ready(worker, *message[1:])
        elif kind == "load_failed":
            with self._cond:
                worker.state, worker.error = "failed", message[1]
            log.error("worker %d could not load its engine: %s", worker.index, message[1])
            self._check_all_failed()
        elif kind == "building":  # its variant is being built beside that worker's edits: its slot is free
            with self._cond:
                job = worker.sent.pop(message[1])
                worker.building[message[1]] = job
                if job.state == "queued":
                    job.state = "building"
        elif kind == "started":
            with self._cond:
                job = worker.sent.pop(message[1], None) or worker.building.pop(message[1])
                worker.running[message[1]] = job
                if job.state in ("queued", "building"):
                    job.state, job.started_at = "running", time.monotonic()
            if self.metrics and job.state == "running":
                self.metrics.queue_wait.labels(job.kind).observe(job.queue_s)
        elif kind == "progress":
            job = worker.running.get(message[1])
            if job is not None and job.on_progress is not None:
                job.on_progress(message[2], message[3])
        elif kind == "skipped":
            with self._cond:
                job = worker.sent.pop(message[1], None) or worker.building.pop(message[1], None)
            if job is not None and job.state in ("queued", "building"):  # its deadline passed before it could start
                self._finish_cancelled(job, "timeout", JobTimeout(job.queue_s, was_running=False))
        elif kind == "answer":
            resolve = worker.asks.pop(message[1], None)
            if resolve is not None:
                resolve((message[2], message[3]))
        elif kind in ("done", "failed"):
            self._finished(worker, message)
        elif kind == "warmed":  # a shape warmed while that worker was idle (service/startup.py: BackgroundWarmups)
            with self._cond:
                worker.warmup = message[1]
                worker.startup = {**worker.startup, **message[2]}

    def _on_ready(self, worker: WorkerProcess, description, startup: dict, status: dict) -> None:
        with self._cond:
            worker.state, worker.startup, worker.status, worker.error = "ready", startup, status, None
            first = self.description is None
            if first:
                self.description = description
            replay = list(self._replay.values())
        log.info("worker %d ready (pid %s) after %.1f s", worker.index, worker.pid, time.monotonic() - worker.started_at)
        for call in replay:  # adapters loaded over HTTP since the pool started: this worker gets them too
            self.submit(call, system=True, target=worker.index)
        if first:
            self.on_event("ready", {"first_worker_ready_s": round(startup.get("load_s", 0.0), 2)})

    def _finished(self, worker: WorkerProcess, message: tuple) -> None:
        job_id, status = message[1], message[-1]
        with self._cond:
            job = worker.running.pop(job_id, None) or worker.building.pop(job_id, None) or worker.sent.pop(job_id)  # refused before it ran
            worker.completed += 1
            worker.status = status
            self.completed += 1
            abandoned = job.state == "cancelled"  # cancelled while buffered, started in a race: nobody waits
            job.finished_at = time.monotonic()
        if message[0] == "done":
            outcome, job.result = "ok", message[2]
            if job.kind in EVERY_ENGINE:
                self._replay[job.call.name] = job.call
        else:
            outcome = message[2]
            job.error = rebuild_error(outcome, job.kind, message[3])
        if self._metrics:
            self._metrics.jobs.labels(str(worker.index), outcome).inc()
            self._metrics.memory(worker)
        if abandoned:
            return
        job.state = "done" if job.error is None else "failed"
        self._account(job, outcome)

    def _on_death(self, worker: WorkerProcess) -> None:
        worker.process.join()
        code = worker.process.exitcode
        for end in (worker.inbox, worker.outbox):
            end.close()
        with self._cond:
            # A job whose variant was being built may be what killed the worker: like a running job, it is not retried.
            lost = [job for job in (*worker.running.values(), *worker.building.values()) if job.state in ("running", "building")]
            requeue = [job for job in worker.sent.values() if job.state == "queued" and job.target is None]
            stranded = [job for job in worker.sent.values() if job.state == "queued" and job.target is not None]
            asks, worker.asks = list(worker.asks.values()), {}
            worker.running.clear()
            worker.building.clear()
            worker.sent.clear()
            self._jobs.extendleft(reversed(requeue))  # back to the front of the queue, in their order
            worker.process, worker.inbox, worker.outbox = None, None, None
            worker.last_exit = {"exit_code": code, "at": time.time(), "jobs_failed": len(lost), "jobs_requeued": len(requeue)}
            was = worker.state
            if self._stopping:
                worker.state = "stopped"
            elif was == "failed":
                pass  # could not load: not restarted
            elif worker.restarts >= self.max_restarts:
                worker.state = "failed"
                worker.error = f"died {worker.restarts + 1} times (last exit code {code}); not restarted again"
            else:
                worker.state = "restarting"
                worker.next_start = time.monotonic() + BACKOFF_S[min(worker.restarts, len(BACKOFF_S) - 1)]
        if not self._stopping and was != "failed":
            log.warning(
                "worker %d (pid %s) died with exit code %s: %d running job(s) failed, %d re-queued; %s",
                worker.index,
                worker.pid,
                code,
                len(lost),
                len(requeue),
                "restarting" if worker.state == "restarting" else worker.error,
            )
        died = WorkerDied(f"worker {worker.index} died with exit code {code} while running it")
        for job in lost + stranded:  # a job meant for this worker alone (a LoRA load) is replayed when it is back
            job.finished_at = time.monotonic()
            job.state, job.error = "failed", died
            if self.metrics:
                self.metrics.jobs.labels(job.kind, "worker_died").inc()
            self._notify(job)
        for resolve in asks:
            resolve((False, ("WorkerDied", str(died), None)))
        self._check_all_failed()

    def _check_all_failed(self) -> None:
        if all(worker.state == "failed" for worker in self.workers):
            self.on_event("failed", "; ".join(f"worker {worker.index}: {worker.error}" for worker in self.workers))

    def _restart_due(self) -> None:
        for worker in self.workers:
            if worker.state == "restarting" and time.monotonic() >= worker.next_start and not self._stopping:
                worker.restarts += 1
                if self._metrics:
                    self._metrics.restarts.labels(str(worker.index)).inc()
                self._spawn(worker)

    def _send_outgoing(self) -> None:
        with self._cond:
            outgoing, self._outgoing = self._outgoing, []
        for worker, message in outgoing:
            self._send(worker, message)

    def _dispatch(self) -> None:
        """Waiting jobs to ready workers with a free slot: the least loaded worker first (one not busy
        with a long job when there is a choice), each taking the job it runs next among those it may
        run (its own targeted ones, and untargeted ones; in merge mode, its adapter set first)."""
        while True:
            with self._cond:
                free = [worker for worker in self.workers if worker.state == "ready" and worker.load < self.slots]
                choice = None
                for worker in sorted(free, key=lambda worker: (worker.load, len(worker.running))):
                    job = self._pick([job for job in self._jobs if job.target in (None, worker.index)], worker.holding)
                    if job is not None:
                        choice = job, worker
                        break
                if choice is None:
                    return
                job, worker = choice
                self._jobs.remove(job)
                job_id = next(self._ids)
                worker.sent[job_id] = job
                if job.affinity is not None:
                    worker.holding = job.affinity
            self._send(worker, ("job", job_id, job.call))

    def _send(self, worker: WorkerProcess, message: tuple) -> None:
        try:
            worker.inbox.send(message)
        except (OSError, AttributeError):
            pass  # dying: its sentinel fires next and _on_death re-queues what it had not started
