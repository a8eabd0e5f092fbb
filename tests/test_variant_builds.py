"""Variant builds beside the serving thread (service/builds.py), in process with the tiny model: a
plain request is answered while another request's variant is being built and compiled, the build
rate per client, and --warm-variants."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.engine import KontextEngine
from engine.requests import EditRequest
from service.app import create_app
from service.settings import ServiceSettings
from tests.asgi_client import ready_client

PLAIN = {"prompt": "make the sky red", "width": 32, "height": 32, "steps": 2, "seed": 5}
COMPILED = {**PLAIN, "seed": 6, "optimizations": {"compile": True}}


def _engine(tiny_engine) -> KontextEngine:
    """The tiny model with a variant cache of its own: every variant here is built here."""
    return KontextEngine(tiny_engine.loaded, tiny_engine.env, max_variants=4)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_plain_request_is_answered_while_another_requests_variant_is_built_and_compiled(tiny_engine):
    engine = _engine(tiny_engine)
    alone = engine.edit(_request(PLAIN))  # what the plain request gives when nothing else runs
    entered, release, compiled = threading.Event(), threading.Event(), threading.Event()
    build_variant = engine.build_variant

    def held_build(request, config=None):  # builds and compiles for real, then holds the build open until the test says
        entered.set()
        seconds = build_variant(request, config)
        compiled.set()
        release.wait(120)
        return seconds

    engine.build_variant = held_build
    app = create_app(engine, ServiceSettings(warmup=False))

    async def scenario():
        async with await ready_client(app, timeout=300) as client:
            building = asyncio.create_task(client.post("/inference", json=COMPILED))
            while not entered.is_set():
                await asyncio.sleep(0.02)
            before = (await client.get("/metrics")).text
            plain = await client.post("/inference", json=PLAIN)
            during = (await client.get("/metrics")).text, (await client.get("/health")).json()["queue"], building.done()
            release.set()
            return plain, before, during, await building

    plain, before, (metrics, queue, build_answered), built = asyncio.run(scenario())
    app.state.service.stop()
    assert plain.status_code == 200 and not build_answered  # answered while the other request's variant was still being built
    assert queue["building"] == 1 and _metric(metrics, "kontext_jobs_building") == 1
    started = 'kontext_queue_wait_seconds_count{kind="inference"}'
    assert _metric(metrics, started) == _metric(before, started) + 1  # the plain job passed the queue; the building one had not
    assert plain.json()["variant"]["build_s"] == 0 and plain.json()["images"][0] == _b64(alone)  # nothing it shares was disturbed
    body = built.json()
    assert built.status_code == 200 and compiled.is_set() and body["active_stages"] == ["compile"]
    assert body["variant"]["built_beside_edits"] and body["timings"]["variant_build_s"] > 0
    assert body["timings"]["queue_s"] >= body["timings"]["variant_build_s"]  # it waited for its own build, in the build lane


def test_a_client_may_cause_only_so_many_builds(tiny_engine):
    app = create_app(_engine(tiny_engine), ServiceSettings(warmup=False, variant_builds_per_hour=1))

    async def scenario():
        async with await ready_client(app) as client:
            first = await client.post("/inference", json={**PLAIN, "optimizations": {"fuse_qkv": True}})
            second = await client.post("/inference", json={**PLAIN, "optimizations": {"channels_last": True}})
            again = await client.post("/inference", json={**PLAIN, "optimizations": {"fuse_qkv": True}})  # built already: no build
            plain = await client.post("/inference", json=PLAIN)
            return first, second, again, plain

    first, second, again, plain = asyncio.run(scenario())
    app.state.service.stop()
    assert first.status_code == again.status_code == plain.status_code == 200
    assert first.json()["variant"]["built_beside_edits"] and "built_beside_edits" not in again.json()["variant"]
    error = second.json()["error"]
    assert second.status_code == 429 and error["type"] == "build_limit" and error["field"] == "optimizations"
    assert "--variant-builds-per-hour" in error["message"] and int(second.headers["Retry-After"]) > 0


def test_warm_variants_are_built_before_ready(tiny_engine):
    settings = ServiceSettings(warmup=False, warm_variants=('{"fuse_qkv": true}',))
    app = create_app(_engine(tiny_engine), settings)

    async def scenario():
        async with await ready_client(app) as client:
            health = (await client.get("/health")).json()
            answer = await client.post("/inference", json={**PLAIN, "optimizations": {"fuse_qkv": True}})
            return health, answer

    health, answer = asyncio.run(scenario())
    app.state.service.stop()
    warmed = health["startup"]["warm_variants"]
    assert [row["optimizations"] for row in warmed] == [{"fuse_qkv": True}] and warmed[0]["shapes"]
    assert any(row["kind"] == "execution" and row["key"].get("fuse_qkv") for row in health["variants"])
    assert answer.status_code == 200 and answer.json()["variant"]["build_s"] == 0 and not answer.json()["variant"]["first_use"]


def test_more_warm_variants_than_the_cache_keeps_is_an_error_at_start(tiny_engine):
    settings = ServiceSettings(warmup=False, warm_variants=('{"fuse_qkv": true}', '{"channels_last": true}', '{"compile": true}', "{}"))
    app = create_app(_engine(tiny_engine), settings)
    service = app.state.service
    service.start()
    for _ in range(200):
        if service.phase == "failed":
            break
        time.sleep(0.05)
    service.stop()
    assert service.phase == "failed" and "--max-variants" in service.error


def _request(body: dict):
    from engine.requests import EditRequest

    return EditRequest(prompt=body["prompt"], width=body["width"], height=body["height"], steps=body["steps"], seed=body["seed"])


def _b64(result) -> str:
    import base64

    from service.images import encode_image

    return base64.b64encode(encode_image(result.images[0], "png")).decode("ascii")


@pytest.mark.parametrize("records", [True, False], ids=["records-cuda-graphs", "replays-only"])
def test_an_edit_that_records_cuda_graphs_waits_for_a_build_beside_it(tiny_engine, monkeypatch, records):
    """A capture must not overlap a build's GPU work (on an H100 a build's synchronize broke the
    serving thread's recording): such an edit waits for the build; every other edit runs beside it."""
    engine = _engine(tiny_engine)
    monkeypatch.setattr(engine, "records_cuda_graphs", lambda prepared: records)
    request = EditRequest(prompt="a sky", width=64, height=64, steps=2, seed=1)
    finished = threading.Event()
    with engine._build_lock:  # a build is running beside the serving thread
        assert engine.building
        edit = threading.Thread(target=lambda: (engine.edit(request), finished.set()))
        edit.start()
        if records:
            assert not finished.wait(2.0)  # it cannot finish while the build holds the lock
        else:
            assert finished.wait(300)
    assert finished.wait(300) and not engine.building
    edit.join(60)


def test_a_shape_warm_up_never_waits_for_a_build_and_stays_pending(tiny_engine, monkeypatch):
    """Idle work must not hold the serving thread for a whole build: a warm-up that would record CUDA
    graphs while a build runs gives its turn back at once, and warms its shape once the build is done."""
    from engine.warmup import Shape, Warmup

    engine = _engine(tiny_engine)
    monkeypatch.setattr(engine, "records_cuda_graphs", lambda prepared: True)
    warmup = Warmup(engine, shapes=[Shape(64, 64, False), Shape(48, 48, False)])
    assert warmup.warm_next()  # the first shape (before /ready: no build can run yet)
    with engine._build_lock:
        assert not warmup.warm_next()
        assert warmup.status()["pending"] == ["48x48 text-to-image"] and not warmup.done
    assert warmup.warm_next() and warmup.done
    assert [row["by"] for row in warmup.report.shapes] == ["warm-up", "warm-up"]


def test_a_build_hands_the_gil_to_the_serving_thread_sooner_and_restores_the_interval(tiny_engine, monkeypatch):
    """While a variant is built beside the serving thread, each of the serving thread's torch calls
    waits at most BUILD_SWITCH_INTERVAL_S for the GIL (engine/serving_priority.py says why)."""
    import sys

    from engine.serving_priority import BUILD_SWITCH_INTERVAL_S

    engine = _engine(tiny_engine)
    seen = []
    edit = engine._edit

    def recording_edit(*args, **kwargs):
        seen.append(sys.getswitchinterval())
        return edit(*args, **kwargs)

    monkeypatch.setattr(engine, "_edit", recording_edit)
    outside = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # CPython's default, whatever ran before this test
    try:
        engine.build_variant(_request(PLAIN))
        engine.edit(_request(PLAIN))
        after = sys.getswitchinterval()
    finally:
        sys.setswitchinterval(outside)
    assert seen == [
        pytest.approx(BUILD_SWITCH_INTERVAL_S),
        pytest.approx(0.005),
    ]  # shortened for the build only (CPython keeps microseconds)
    assert after == pytest.approx(0.005)
