"""SIGTERM during load, on a real server: new work gets 503 at once, /ready turns 503, every request
already accepted (running or queued) is answered 200, then the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import httpx
import pytest

from tests.service_server import start_server

pytestmark = pytest.mark.slow

WORK = {"prompt": "make the sky red", "width": 128, "height": 128, "steps": 6}


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones():
    server = start_server("drain", ["--queue-size", "16"])
    try:

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                accepted = [asyncio.create_task(http.post("/inference", json={**WORK, "seed": seed})) for seed in range(8)]
                while (await http.get("/health")).json()["queue"]["waiting"] < 3:
                    await asyncio.sleep(0.05)
                server.signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                refused = await http.post("/inference", json=WORK)
                ready = await http.get("/ready")
                health = await http.get("/health")
                return await asyncio.gather(*accepted), refused, ready, health

        accepted, refused, ready, health = asyncio.run(scenario())
        assert [response.status_code for response in accepted] == [200] * 8
        assert all(len(response.json()["images"]) == 1 for response in accepted)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
        assert refused.headers["Retry-After"] and refused.headers["Connection"] == "close"
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert health.status_code == 200 and health.json()["status"] == "draining"
        assert server.process.wait(60) == 0, server.log()
        assert "drained" in server.log(tail=10**6)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)
    finally:
        try:
            server.stop()
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
