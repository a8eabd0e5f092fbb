"""`serve --gpus 0,1 --device cpu`: two worker processes with the tiny model behind one HTTP front
(CPU workers stand in for GPUs; the code path is the same but for CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import base64
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service_server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
SMALL = {"prompt": "make the sky red", "width": 64, "height": 64, "steps": 2, "seed": 3}
WAIT_S = 240.0


BENCHMARK = ["--benchmark-stages", "0", "--benchmark-warmup", "0", "--benchmark-repeats", "1", "--benchmark-size", "32"]


@pytest.fixture(scope="module")
def server(lora_dir):
    args = ["--gpus", "0,1", "--device", "cpu", "--no-warmup", "--queue-size", "32", "--lora-dir", str(lora_dir), "--lora-max-rank", "8"]
    server = start_server("gpus", args + BENCHMARK)
    deadline = time.monotonic() + WAIT_S  # /ready turns 200 with the first worker; these tests need both
    while httpx.get(f"{server.url}/health", timeout=30).json()["queue"]["workers_ready"] < 2:
        assert time.monotonic() < deadline, f"the second worker never became ready:\n{server.log()}"
        time.sleep(0.5)
    yield server
    assert server.stop() == 0


def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=WAIT_S) as client, ThreadPoolExecutor(len(bodies)) as threads:
        return list(threads.map(lambda body: client.post("/inference", json=body), bodies))


def workers(url: str) -> list[dict]:
    return httpx.get(f"{url}/health", timeout=30).json()["workers"]


def test_two_workers_serve_concurrent_requests_with_the_same_images(server):
    built = post_all(server.url, [{**SMALL, "optimizations": {"fuse_qkv": True}}])[0]
    assert built.status_code == 200 and built.json()["variant"]["built_beside_edits"], built.text[:300]  # a worker's build lane
    answers = post_all(server.url, [SMALL] * 6)
    assert [answer.status_code for answer in answers] == [200] * 6, [answer.text[:300] for answer in answers]
    images = {base64.b64decode(answer.json()["images"][0]) for answer in answers}
    assert len(images) == 1  # one seed, one image, whichever worker ran it
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["status"] == "ready" and health["queue"]["workers_ready"] == 2
    assert sum(worker["completed"] for worker in health["workers"]) >= 6
    assert all(worker["completed"] >= 1 for worker in health["workers"])  # both served
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'kontext_worker_up{worker="0"} 1.0' in metrics and 'kontext_worker_up{worker="1"} 1.0' in metrics
    assert 'kontext_jobs_total{kind="inference",outcome="ok"}' in metrics


def test_killed_worker_is_restarted_and_queued_requests_complete(server):
    victim = workers(server.url)[0]
    bodies = [{**SMALL, "width": 256, "height": 256, "steps": 6, "seed": n} for n in range(8)]
    with ThreadPoolExecutor(1) as background:
        pending = background.submit(post_all, server.url, bodies)
        deadline = time.monotonic() + WAIT_S
        while workers(server.url)[0]["running"] is None:  # kill it mid-edit, with requests waiting
            assert time.monotonic() < deadline, "worker 0 never started an edit"
            time.sleep(0.05)
        os.kill(victim["pid"], signal.SIGKILL)
        answers = pending.result()
    codes = [answer.status_code for answer in answers]
    assert codes.count(200) >= len(bodies) - 1, [answer.text[:300] for answer in answers]
    failed = [answer.json()["error"] for answer in answers if answer.status_code != 200]
    assert all(error["type"] == "worker_died" for error in failed)  # at most the edit it was running
    deadline = time.monotonic() + WAIT_S
    while (worker := workers(server.url)[0])["state"] != "ready":
        assert time.monotonic() < deadline, f"worker 0 not back: {worker}"
        time.sleep(0.5)
    assert worker["pid"] != victim["pid"] and worker["restarts"] == 1 and worker["last_exit"]["exit_code"] == -signal.SIGKILL
    assert [answer.status_code for answer in post_all(server.url, [SMALL] * 2)] == [200, 200]


def test_adapters_are_listed_and_loaded_on_every_worker(server):
    listing = httpx.get(f"{server.url}/v1/loras", timeout=30)
    assert listing.status_code == 200 and {"style", "kohya", "detail"} <= set(listing.json()["available"])
    loaded = httpx.post(f"{server.url}/v1/loras", json={"name": "style"}, timeout=WAIT_S)
    assert loaded.status_code == 200 and loaded.json()["loaded"]["name"] == "style", loaded.text
    assert all(worker["loras"] == ["style"] for worker in workers(server.url))
    answers = post_all(server.url, [{**SMALL, "loras": [{"name": "style", "scale": 0.8}]}] * 4)
    assert [answer.status_code for answer in answers] == [200] * 4, [answer.text[:300] for answer in answers]
    assert len({answer.json()["images"][0] for answer in answers}) == 1  # the same adapter on whichever worker ran it
    assert {answer.json()["extras"]["lora"]["adapters"][0]["name"] for answer in answers} == {"style"}
    assert httpx.delete(f"{server.url}/v1/loras/style", timeout=WAIT_S).status_code == 200
    assert all(worker["loras"] == [] for worker in workers(server.url))


def test_a_benchmark_runs_on_one_worker_and_is_read_from_the_front(server):
    started = httpx.post(f"{server.url}/benchmark?stages=0", timeout=30)
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + WAIT_S
    while (answer := httpx.get(f"{server.url}/benchmark", timeout=30)).status_code == 202:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.5)
    table = answer.json()
    assert answer.status_code == 200 and table["status"] == "done" and table["stages"] == [0]
    assert "| 0 |" in table["markdown"] and table["report"]["rows"][0]["stage"] == 0
