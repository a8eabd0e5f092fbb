"""The GPU queue's failure modes, in process, with a controllable engine in front of the tiny one:
out of memory (503, memory released, next request served), timeouts while queued and while
running (504; a queued one never reaches the GPU), a full queue (429 + Retry-After at once), a
client gone while queued (dropped), and per-request variant policy."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import service.jobs as jobs_module
from service.app import create_app
from service.jobs import ClientGone
from service.queue import GpuWorker
from service.settings import ServiceSettings
from tests.asgi_client import ready_client

SMALL = {"prompt": "make the sky red", "width": 32, "height": 32, "steps": 1, "seed": 1}


class ScriptedEngine:
    """The tiny engine, with scripted faults and delays before each edit."""

    def __init__(self, engine):
        self._engine = engine
        self.script: list = []  # per call: None, a float (seconds to block) or an exception to raise
        self.calls = 0
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def edit(self, request, config=None, progress=False, should_stop=None):
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, (int, float)):
            self.release.wait(step)
        return self._engine.edit(request, config, should_stop=should_stop)


def _app(engine, **settings):
    return create_app(engine, ServiceSettings(warmup=False, **settings))


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_out_of_memory_fails_one_request_and_the_server_recovers(tiny_engine, monkeypatch):
    engine = ScriptedEngine(tiny_engine)
    engine.script = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")]
    released = []
    original = jobs_module.release_memory
    monkeypatch.setattr(jobs_module, "release_memory", lambda: (released.append(True), original())[1])
    app = _app(engine)

    async def scenario():
        async with await ready_client(app) as client:
            failed = await client.post("/inference", json=SMALL)
            served = await client.post("/inference", json=SMALL)
            health = await client.get("/health")
            metrics = await client.get("/metrics")
            return failed, served, health, metrics

    failed, served, health, metrics = asyncio.run(scenario())
    app.state.service.stop()
    assert failed.status_code == 503
    error = failed.json()["error"]
    assert error["type"] == "gpu_out_of_memory" and "out of memory" in error["message"] and "keeps serving" in error["message"]
    assert failed.headers["Retry-After"] == "1"
    assert released == [True]
    assert served.status_code == 200 and len(served.json()["images"]) == 1
    assert health.json()["status"] == "ready"
    assert _metric(metrics.text, 'kontext_jobs_total{kind="inference",outcome="out_of_memory"}') == 1


def test_release_memory_empties_the_cuda_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    jobs_module.release_memory()
    assert emptied == [True]


def test_timeouts_count_queued_time_and_queued_jobs_never_run(tiny_engine):
    engine = ScriptedEngine(tiny_engine)
    engine.script = [5.0]  # the first edit blocks the worker past both deadlines
    app = _app(engine, request_timeout=1.0)

    async def scenario():
        async with await ready_client(app) as client:
            first = asyncio.create_task(client.post("/inference", json=SMALL))
            await asyncio.sleep(0.3)
            second = await client.post("/inference", json=SMALL)
            first = await first
            engine.release.set()
            return first, second

    started = time.monotonic()
    running, queued = asyncio.run(scenario())
    elapsed = time.monotonic() - started
    service = app.state.service
    for _ in range(100):
        if service.worker.idle:
            break
        time.sleep(0.05)
    service.stop()
    assert running.status_code == 504 and "while its edit was running" in running.json()["error"]["message"]
    assert queued.status_code == 504 and "never reached the GPU" in queued.json()["error"]["message"]
    assert elapsed < 4.0  # answered at the deadline, not when the blocked edit ended
    assert engine.calls == 1  # the queued request was dropped before the engine saw it
    # both timed out: the queued one was dropped, the running one (released after its deadline)
    # stopped at its first step boundary instead of finishing
    assert 'kontext_jobs_total{kind="inference",outcome="cancelled_timeout"} 2.0' in service.metrics.render().decode()


def test_full_queue_answers_429_with_retry_after_at_once(tiny_engine):
    engine = ScriptedEngine(tiny_engine)
    engine.script = [10.0]
    app = _app(engine, queue_size=1)

    async def scenario():
        async with await ready_client(app) as client:
            running = asyncio.create_task(client.post("/inference", json=SMALL))
            await asyncio.sleep(0.3)
            waiting = asyncio.create_task(client.post("/inference", json=SMALL))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            rejected = await client.post("/inference", json=SMALL)
            rejected_after = time.monotonic() - started
            engine.release.set()
            return await running, await waiting, rejected, rejected_after

    running, waiting, rejected, rejected_after = asyncio.run(scenario())
    app.state.service.stop()
    assert running.status_code == 200 and waiting.status_code == 200
    assert rejected.status_code == 429 and rejected.json()["error"]["type"] == "queue_full"
    assert int(rejected.headers["Retry-After"]) >= 1
    assert rejected_after < 1.0


@dataclass
class Step:
    """A call for queue tests: runs `action(job context)` on the worker."""

    action: Callable
    kind: str = "inference"
    deadline: float = field(default_factory=lambda: time.monotonic() + 20)
    affinity: str | None = None

    def run(self, engine, job):
        return self.action(job)


def idle_worker(tiny_engine, capacity: int = 4) -> GpuWorker:
    worker = GpuWorker(capacity=capacity, poll_s=0.05, engine=tiny_engine, settings=ServiceSettings(warmup=False))
    worker.start()
    return worker


def test_a_job_whose_client_left_is_dropped_before_it_runs(tiny_engine):
    worker = idle_worker(tiny_engine)
    gate = threading.Event()
    ran = []

    async def scenario():
        blocker = asyncio.create_task(worker.run(Step(lambda job: gate.wait(5)), deadline=time.monotonic() + 10))
        await asyncio.sleep(0.1)

        async def gone() -> bool:
            return True

        with pytest.raises(ClientGone):
            await worker.run(Step(lambda job: ran.append(True)), deadline=time.monotonic() + 10, is_disconnected=gone)
        gate.set()
        await blocker

    asyncio.run(scenario())
    worker.stop(5)
    assert ran == [] and worker.waiting == 0


def test_without_per_request_variants_build_stages_follow_the_server(tiny_engine):
    app = _app(tiny_engine, per_request_variants=False)

    async def scenario():
        async with await ready_client(app) as client:
            return await client.post(
                "/inference", json={**SMALL, "optimizations": {"compile": True, "cache_threshold": 0.3}, "use_qkv_fusion": True}
            )

    response = asyncio.run(scenario())
    app.state.service.stop()
    body = response.json()
    assert response.status_code == 200
    assert body["optimizations"]["compile"] is False and body["optimizations"]["fuse_qkv"] is False
    assert body["optimizations"]["cache_threshold"] == 0.3  # per-request settings still apply
    assert "fixed optimization variant" in body["skipped_stages"]["compile"]
    assert any(warning.startswith("compile=True ignored") for warning in body["warnings"])


def test_a_long_job_lets_waiting_user_jobs_run_between_its_pieces(tiny_engine):
    """What a benchmark does after each of its edits: the user jobs that queued up meanwhile run
    first, so none waits for more than one piece of the long job."""
    worker = idle_worker(tiny_engine)
    order: list[str] = []
    piece_started = threading.Event()
    piece_may_end = threading.Event()

    def long_job(job):
        for piece in range(3):
            order.append(f"long {piece}")
            if piece == 0:
                piece_started.set()
                piece_may_end.wait(5)
            job.serve_waiting()

    async def scenario():
        long = asyncio.create_task(worker.run(Step(long_job, kind="benchmark"), deadline=time.monotonic() + 20))
        while not piece_started.is_set():
            await asyncio.sleep(0.01)
        user = asyncio.create_task(worker.run(Step(lambda job: order.append("user")), deadline=time.monotonic() + 20))
        other_long = worker.submit(Step(lambda job: order.append("second benchmark"), kind="benchmark"))
        await asyncio.sleep(0.1)
        piece_may_end.set()
        await user
        await long
        for _ in range(100):
            if other_long.state == "done":
                break
            await asyncio.sleep(0.02)
        return other_long

    other_long = asyncio.run(scenario())
    worker.stop(5)
    # the user job ran right after the first piece; another benchmark waited for its turn
    assert order == ["long 0", "user", "long 1", "long 2", "second benchmark"]
    with pytest.raises(RuntimeError):
        worker.run_waiting(other_long)  # only the worker thread itself may do this


def test_a_benchmark_through_http_yields_to_an_edit(tiny_engine):
    engine = ScriptedEngine(tiny_engine)
    app = _app(engine, benchmark_stages=(0,), benchmark_repeats=3, benchmark_warmup=0, benchmark_size=32)
    gate = threading.Event()
    benchmark_edits = []
    original_edit = engine.edit

    def edit(request, config=None, progress=False, should_stop=None):
        if request.prompt == "make the sky red" and request.width == 32 and request.seed == 0:  # the benchmark's request
            benchmark_edits.append(time.monotonic())
            if len(benchmark_edits) == 1:
                gate.wait(10)
        return original_edit(request, config, should_stop=should_stop)

    engine.edit = edit

    async def scenario():
        async with await ready_client(app) as client:
            assert (await client.post("/benchmark")).status_code == 202
            while not benchmark_edits:
                await asyncio.sleep(0.02)
            user = asyncio.create_task(client.post("/inference", json={**SMALL, "seed": 5}))
            await asyncio.sleep(0.3)
            gate.set()
            answered = await user
            progress = (await client.get("/health")).json()["benchmark"]["running"]
            await client.delete("/benchmark")
            return answered, progress

    answered, progress = asyncio.run(scenario())
    app.state.service.stop()
    assert answered.status_code == 200
    assert progress is not None  # the edit was answered while the benchmark still had edits to run
    assert len(benchmark_edits) < 3 + 4 * 3 + 3 * 3  # and the benchmark did not run to its end before it


def test_merge_mode_runs_waiting_requests_with_the_held_adapter_set_first_within_a_bound(tiny_engine):
    """In merge mode an edit carries its adapter set as its affinity: a waiting one with the set the
    engine holds runs before older ones, but none waits behind more than GROUP_PASSES of those."""
    from service.worker import GROUP_PASSES

    worker = idle_worker(tiny_engine, capacity=8)
    order: list[str] = []
    gate = threading.Event()

    def step(label: str, action=None) -> Step:
        return Step(action or (lambda job: order.append(label)), affinity=label[0])

    async def scenario():
        first = asyncio.create_task(worker.run(step("A1", lambda job: (gate.wait(10), order.append("A1"))), time.monotonic() + 30))
        while not worker.running:
            await asyncio.sleep(0.01)
        later = [asyncio.create_task(worker.run(step(label), time.monotonic() + 30)) for label in ("B1", "A2", "A3", "A4", "A5", "B2")]
        while worker.waiting < len(later):
            assert not any(task.done() for task in later), [task.exception() for task in later if task.done()]
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *later)

    asyncio.run(scenario())
    worker.stop(5)
    assert GROUP_PASSES == 3
    # A2-A4 pass B1 (three times), then B1 runs; B2 now needs no swap and passes A5 once
    assert order == ["A1", "A2", "A3", "A4", "B1", "B2", "A5"]
