"""serve --gpus' worker pool with stand-in engines (tests/fake_workers.py): every accepted job runs
exactly once across two worker processes, and a killed worker costs only the job it was running."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time

import pytest

from service.jobs import QueueFull, WorkerDied
from service.settings import ServiceSettings
from service.worker_pool import WorkerPool
from tests.fake_workers import LoggedCall, load_fake_engine

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
WAIT_S = 180.0  # generous: spawning a worker imports torch and diffusers, on a busy machine


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout:.0f} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool():
    pool = WorkerPool([None, None], load_fake_engine, ServiceSettings(warmup=False), capacity=64, slots=2)
    pool.start()
    wait_until(lambda: pool.ready_engines == 2, "both workers to be ready")
    yield pool
    pool.stop(30)


def runs(log_path) -> tuple[collections.Counter, collections.Counter, dict[int, int]]:
    starts, dones, pids = collections.Counter(), collections.Counter(), {}
    for line in log_path.read_text().splitlines():
        kind, n, pid = line.split()
        (starts if kind == "start" else dones)[int(n)] += 1
        pids[int(n)] = int(pid)
    return starts, dones, pids


async def run_all(pool: WorkerPool, calls: list[LoggedCall]) -> list:
    far = time.monotonic() + 600

    async def one(call):
        try:
            result, _job = await pool.run(call, far)
            return result
        except WorkerDied as died:
            return died

    return await asyncio.gather(*(one(call) for call in calls))


def test_two_workers_run_every_job_exactly_once(pool, tmp_path):
    log_path = tmp_path / "runs.log"
    calls = [LoggedCall(n, 0.02, str(log_path)) for n in range(24)]
    results = asyncio.run(run_all(pool, calls))
    assert [result["n"] for result in results] == list(range(24))
    starts, dones, pids = runs(log_path)
    assert set(starts) == set(dones) == set(range(24))
    assert set(starts.values()) == set(dones.values()) == {1}  # none lost, none run twice
    assert len(set(pids.values())) == 2  # both workers served
    assert pool.idle and pool.snapshot()["waiting"] == 0


def test_queue_bound_still_answers_429(pool, tmp_path):
    small = WorkerPool([None], load_fake_engine, ServiceSettings(warmup=False), capacity=1)  # not started: nothing drains it
    small.submit(LoggedCall(0, 0.0, str(tmp_path / "x.log")))
    with pytest.raises(QueueFull):
        small.submit(LoggedCall(1, 0.0, str(tmp_path / "x.log")))


def test_killed_worker_fails_only_its_running_job_and_is_restarted(pool, tmp_path):
    log_path = tmp_path / "runs.log"
    victim = pool.workers[0]
    old_pid = victim.pid
    calls = [LoggedCall(n, 0.4, str(log_path)) for n in range(12)]

    async def scenario():
        task = asyncio.ensure_future(run_all(pool, calls))
        # Kill it while it runs one job and holds a second, not started, in its slot.
        deadline = time.monotonic() + WAIT_S
        while not (victim.running and victim.sent):
            assert time.monotonic() < deadline, "worker 0 never held a running and a buffered job"
            await asyncio.sleep(0.01)
        os.kill(old_pid, signal.SIGKILL)
        return await task

    results = asyncio.run(scenario())
    died = [n for n, result in enumerate(results) if isinstance(result, WorkerDied)]
    starts, dones, pids = runs(log_path)
    assert len(died) == 1 and pids[died[0]] == old_pid  # the job it was running, and only that one
    assert set(starts.values()) == {1}  # nothing ran twice (the buffered job went back to the queue)
    assert set(dones) == set(range(12)) - set(died)  # every other accepted job completed
    assert victim.last_exit["exit_code"] == -signal.SIGKILL and victim.last_exit["jobs_requeued"] >= 1

    wait_until(lambda: victim.state == "ready", "the killed worker to come back")
    assert victim.pid != old_pid and victim.restarts == 1
    again = asyncio.run(run_all(pool, [LoggedCall(100 + n, 0.3, str(log_path)) for n in range(4)]))
    assert {result["pid"] for result in again} == {victim.pid, pool.workers[1].pid}  # the new process serves too
