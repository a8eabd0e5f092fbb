"""An in-process client for a service app: starts the app's GPU worker, waits until it is ready,
then talks to it over ASGI (no socket, no port), so a test sees exactly what a client would."""

from __future__ import annotations

import asyncio

import httpx

READY_TIMEOUT_S = 10.0


async def ready_client(app, timeout: float = 60) -> httpx.AsyncClient:
    """Start `app`'s service, wait for `ready`, and return a client for it (use it with `async with`)."""
    service = app.state.service
    service.start()
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    while not service.ready:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"the service was not ready within {READY_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=timeout)
