"""Under load, over real HTTP, on a server with an API key and a queue of 4: every request is answered
200 or 429 (none lost, none hung), a client that leaves while queued costs no GPU time, and the
server is healthy afterwards."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from tests.service_server import API_KEY, api_server, guarded_server

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TINY = {"prompt": "make the sky red", "width": 32, "height": 32, "steps": 1}


@pytest.fixture(scope="module")
def server(pytestconfig):
    return guarded_server(pytestconfig)


def metric(server, prefix: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30).text  # the api server ignores the key
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def wait_idle(server, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        queue = httpx.get(f"{server.url}/health", timeout=30).json()["queue"]
        if queue["waiting"] == 0 and queue["running"] is None:
            return queue
        assert time.monotonic() < deadline, queue
        time.sleep(0.2)


# -- API key ------------------------------------------------------------------------------------
def test_api_key_required_everywhere_but_health_and_ready(server):
    for path in ("/health", "/ready"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    for method, path in (
        ("GET", "/metrics"),
        ("GET", "/benchmark"),
        ("GET", "/openapi.json"),
        ("POST", "/inference"),
        ("POST", "/v1/images/generations"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.request(method, server.url + path, headers=headers, json=TINY, timeout=30)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Bearer") and response.json()["error"]["type"] == "unauthorized"
    assert httpx.post(f"{server.url}/inference", headers=AUTH, json=TINY, timeout=60).status_code == 200


def test_no_cors_headers_unless_configured(server):
    response = httpx.get(f"{server.url}/health", headers={"Origin": "https://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in response.headers


# -- load -----------------------------------------------------------------------------------------
def test_32_clients_256_requests_all_answered_200_or_429(server):
    ok_before = metric(server, 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="ok"}')
    rejected_before = metric(server, 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="rejected_queue_full"}')

    async def one_client(http: httpx.AsyncClient, index: int) -> list[tuple[int, str | None]]:
        answers = []
        for request in range(8):
            response = await http.post("/inference", json={**TINY, "seed": index * 100 + request})
            answers.append((response.status_code, response.headers.get("Retry-After")))
            if response.status_code == 200:
                assert len(response.json()["images"]) == 1
        return answers

    async def load() -> list[tuple[int, str | None]]:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=httpx.Timeout(60), limits=limits) as http:
            results = await asyncio.gather(*(one_client(http, index) for index in range(32)))
        return [answer for answers in results for answer in answers]

    started = time.monotonic()
    answers = asyncio.run(load())
    elapsed = time.monotonic() - started
    statuses = [status for status, _ in answers]
    assert len(answers) == 256
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1
    assert all(retry is not None and int(retry) >= 1 for status, retry in answers if status == 429)
    assert elapsed < 120
    queue = wait_idle(server)
    assert queue["in_flight_requests"] == 0
    assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
    assert metric(server, 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="ok"}') - ok_before == statuses.count(
        200
    )
    assert metric(
        server, 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="rejected_queue_full"}'
    ) - rejected_before == statuses.count(429)


def test_a_client_that_disconnects_while_queued_never_reaches_the_gpu(pytestconfig):
    server = api_server(pytestconfig)  # default limits: room for a long edit to queue behind
    wait_idle(server)
    ran_before = metric(server, 'kontext_jobs_total{kind="inference",outcome="ok"}')
    dropped_before = metric(server, 'kontext_jobs_total{kind="inference",outcome="cancelled_client_disconnected"}')
    body = json.dumps({**TINY, "seed": 42}).encode()
    request = (
        f"POST /inference HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            blocker = asyncio.create_task(http.post("/inference", json={**TINY, "width": 768, "height": 768, "steps": 8}))
            while (await http.get("/health")).json()["queue"]["running"] is None:
                await asyncio.sleep(0.05)
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
                connection.sendall(request)
                await asyncio.sleep(0.5)  # queued behind the blocker; then the client goes away
            assert (await http.get("/health")).json()["queue"]["running"] is not None, "the blocker ended too soon"
            return await blocker

    assert asyncio.run(scenario()).status_code == 200
    wait_idle(server)
    assert metric(server, 'kontext_jobs_total{kind="inference",outcome="cancelled_client_disconnected"}') - dropped_before == 1
    assert metric(server, 'kontext_jobs_total{kind="inference",outcome="ok"}') - ran_before == 1  # the blocker only
    assert httpx.post(f"{server.url}/inference", json=TINY, timeout=60).status_code == 200
