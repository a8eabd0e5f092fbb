"""/ready after the first shape; the other shapes are warmed on the serving thread while nothing
waits, a request never waits behind more than one of them, and a shape a request ran first is not
warmed again. No timed assertions: a gate holds the background warm-up where a test needs it."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
import types

import httpx
import pytest
from PIL import Image

import engine.warmup as warmup_module
from engine.engine import KontextEngine
from engine.requests import EditRequest
from engine.warmup import Shape, Warmup
from service.app import create_app
from service.settings import ServiceSettings
from tests.asgi_client import ready_client
from tests.service_server import api_server

WAIT_S = 240.0  # generous: a loaded 2-core machine
SHAPES = [Shape(64, 64, True), Shape(64, 64, False), Shape(96, 64, True), Shape(96, 64, False)]


def _engine(tiny_engine) -> KontextEngine:
    """The shared tiny model with variants of its own: no shape run by another test counts here."""
    return KontextEngine(tiny_engine.loaded, tiny_engine.env, max_variants=8)


class Gate:
    """Holds the warm-up edit of one shape until `opened`; `reached` says the worker is inside it."""

    def __init__(self, engine: KontextEngine, held: Shape):
        self.reached, self.opened = threading.Event(), threading.Event()
        self.warmed: list[Shape] = []
        edit = engine.edit

        def gated(request: EditRequest, config=None, **options):
            if request.prompt == "warm-up":
                shape = Shape(request.width, request.height, request.image is not None)
                self.warmed.append(shape)
                if shape == held:
                    self.reached.set()
                    assert self.opened.wait(WAIT_S), "the test never opened the gate"
            return edit(request, config, **options)

        engine.edit = gated


async def _until(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"waited {WAIT_S:.0f} s for {what}"
        await asyncio.sleep(0.05)


async def _send_while_held(client, gate: Gate, body: dict):
    """Post `body` while the gate holds a warm-up, wait until it queues behind it, open the gate; the response."""
    answer = asyncio.create_task(client.post("/inference", json=body))

    async def queued():
        return (await client.get("/health")).json()["queue"]["waiting"] == 1

    await _until(queued, "the request to wait in the queue")
    gate.opened.set()
    return await answer


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_shape_a_request_ran_first_is_not_warmed_again(tiny_engine):
    engine = _engine(tiny_engine)
    warmup = Warmup(engine, shapes=[SHAPES[0], SHAPES[2], SHAPES[3]])
    assert warmup.warm_next() and warmup.status()["pending"] == ["96x64 edit", "96x64 text-to-image"]
    engine.edit(EditRequest(prompt="x", image=Image.new("RGB", (96, 64)), width=96, height=64, steps=2, seed=0))
    engine.edit(EditRequest(prompt="x", width=96, height=64, steps=1, seed=0))  # one step records nothing: still warmed
    assert warmup.warm_next() and not warmup.warm_next() and warmup.done
    assert [row["by"] for row in warmup.report.shapes] == ["warm-up", "request", "warm-up"]
    assert warmup.status() == {"warmed": ["64x64 edit", "96x64 edit", "96x64 text-to-image"], "failed": [], "warming": None, "pending": []}
    assert warmup.report.done_at is not None and "other_shapes_s" in warmup.report.phases


def test_ready_after_the_first_shape_the_rest_while_idle(tiny_engine, monkeypatch):
    engine = _engine(tiny_engine)
    monkeypatch.setattr(warmup_module, "shapes_for", lambda engine: list(SHAPES))
    gate = Gate(engine, held=SHAPES[1])
    app = create_app(engine, ServiceSettings(warmup=True))

    async def scenario():
        async with await ready_client(app, timeout=WAIT_S) as client:
            assert await asyncio.to_thread(gate.reached.wait, WAIT_S), "the background warm-up never started"
            at_ready = (await client.get("/health")).json()
            # a request at a shape not warmed yet, sent while a shape is being warmed: it waits for that one only
            body = {"prompt": "edit", "image": _png(96, 64), "width": 96, "height": 64, "steps": 2, "seed": 1}
            response = await _send_while_held(client, gate, body)

            async def all_warm():
                return (await client.get("/health")).json()["warmup"]["done"]

            await _until(all_warm, "every shape to be warm")
            return at_ready, response, (await client.get("/health")).json(), (await client.get("/metrics")).text

    try:
        at_ready, response, health, metrics = asyncio.run(scenario())
    finally:
        gate.opened.set()
        app.state.service.stop()
    assert at_ready["ready"] and at_ready["warmup"] == {
        "done": False,
        "warmed": ["64x64 edit"],
        "failed": [],
        "warming": "64x64 text-to-image",
        "pending": ["96x64 edit", "96x64 text-to-image"],
    }
    assert response.status_code == 200 and (response.json()["width"], response.json()["height"]) == (96, 64)
    assert health["warmup"]["warmed"] == [shape.label() for shape in SHAPES] and not health["warmup"]["pending"]
    rows = health["startup"]["warmup"]["shapes"]
    assert [row["by"] for row in rows] == ["warm-up", "warm-up", "request", "warm-up"]  # the request's shape was skipped
    assert gate.warmed == [SHAPES[0], SHAPES[1], SHAPES[3]]
    assert health["startup"]["warmup"]["done_at"] >= health["startup"]["ready_at"]
    assert 'kontext_warmup_shapes{state="warmed"} 4.0' in metrics and 'kontext_warmup_shapes{state="pending"} 0.0' in metrics


def test_no_shape_is_warmed_until_the_server_has_been_quiet(tiny_engine, monkeypatch):
    """A client's back-to-back requests never wait behind a warm-up (--warm-after-idle-s): after a
    request, the shapes left stay pending for the quiet time (here an hour)."""
    engine = _engine(tiny_engine)
    monkeypatch.setattr(warmup_module, "shapes_for", lambda engine: list(SHAPES[:3]))
    gate = Gate(engine, held=SHAPES[1])
    app = create_app(engine, ServiceSettings(warmup=True, warm_after_idle_s=3600.0))

    async def scenario():
        async with await ready_client(app, timeout=WAIT_S) as client:
            # the first warm-up after /ready starts at once: no request has come yet
            assert await asyncio.to_thread(gate.reached.wait, WAIT_S), "the background warm-up never started"
            body = {"prompt": "edit", "image": _png(64, 64), "width": 64, "height": 64, "steps": 2, "seed": 1}
            response = await _send_while_held(client, gate, body)
            await asyncio.sleep(1.0)  # without the quiet time, the next shape would be warming or warm by now
            return response, (await client.get("/health")).json()["warmup"]

    try:
        response, warmup = asyncio.run(scenario())
    finally:
        gate.opened.set()
        app.state.service.stop()
    assert response.status_code == 200
    assert warmup["warmed"] == ["64x64 edit", "64x64 text-to-image"] and warmup["warming"] is None
    assert warmup["pending"] == ["96x64 edit"] and gate.warmed == SHAPES[:2]


def test_warm_all_before_ready_restores_warming_every_shape_first(tiny_engine, monkeypatch):
    engine = _engine(tiny_engine)
    monkeypatch.setattr(warmup_module, "shapes_for", lambda engine: list(SHAPES[:2]))
    app = create_app(engine, ServiceSettings(warmup=True, warm_all_before_ready=True))

    async def scenario():
        async with await ready_client(app, timeout=WAIT_S) as client:
            return (await client.get("/health")).json()

    try:
        health = asyncio.run(scenario())
    finally:
        app.state.service.stop()
    assert health["warmup"] == {"done": True, "warmed": ["64x64 edit", "64x64 text-to-image"], "failed": [], "warming": None, "pending": []}
    startup = health["startup"]
    assert startup["warmup"]["done_at"] <= startup["ready_at"] and set(startup["warmup"]["phases"]) == {"first_shape_s", "other_shapes_s"}


@pytest.mark.parametrize("flag, expected", [([], False), (["--warm-all-before-ready"], True)])
def test_the_flag_comes_from_the_settings_declaration(flag, expected):
    from cli.options import build_parser, service_settings_from_args

    assert service_settings_from_args(build_parser().parse_args(["serve", *flag])).warm_all_before_ready is expected


def test_a_real_server_reports_its_start_up_phase_by_phase(pytestconfig):
    """`serve` (the README's): ready after its first shape, every shape warm soon after, each phase timed."""
    server = api_server(pytestconfig)
    deadline = time.monotonic() + WAIT_S
    while not (health := httpx.get(f"{server.url}/health", timeout=30).json())["warmup"]["done"]:
        assert time.monotonic() < deadline, "the background warm-up never finished"
        time.sleep(0.2)
    startup = health["startup"]
    assert health["warmup"]["warmed"] == ["256x256 edit", "256x256 text-to-image"]
    for phase in ("imports_s", "engine_imports_s", "load_s", "compile_artifacts_s", "ready_after_process_start_s"):
        assert startup[phase] is not None and startup[phase] >= 0, phase
    assert startup["imports_s"] + startup["load_s"] <= startup["ready_after_process_start_s"]
    assert startup["warmup"]["phases"]["first_shape_s"] > 0 and startup["warmup"]["done_at"] >= startup["ready_at"] - 0.01
    assert "start-up: imports" in server.log(tail=200_000)


class _Residency:
    """A VariantCache's deferred move to host memory, as BackgroundWarmups sees it: `slices` to go."""

    def __init__(self, slices: int, fail: bool = False):
        self.slices, self.fail, self.calls = slices, fail, []

    @property
    def residency_pending(self) -> bool:
        return self.slices > 0

    def settle_some(self) -> bool:
        self.calls.append("slice")
        if self.fail:
            raise RuntimeError("copy failed")
        self.slices -= 1
        return self.slices > 0


class _Shapes:
    """A Warmup with `left` shapes to warm; records each into `log`."""

    def __init__(self, left: int, log: list):
        self.left, self.log = left, log
        self.report = types.SimpleNamespace(done_at=None)

    def status(self) -> dict:
        return {"warmed": ["shape"] * self.log.count("shape"), "failed": [], "warming": None, "pending": ["shape"] * self.left}

    @property
    def done(self) -> bool:
        return self.left == 0

    def warm_next(self) -> bool:
        self.log.append("shape")
        self.left -= 1
        return not self.done


def test_idle_work_warms_the_shapes_first_then_moves_the_replaced_weights_a_slice_at_a_time():
    from service.startup import BackgroundWarmups

    done: list = []
    residency = _Residency(slices=3)
    residency.calls = done
    background = BackgroundWarmups([(None, _Shapes(2, done))], residency=residency)
    assert background.wait_s(last_job_end=time.monotonic(), quiet_s=3600.0) > 3000  # a job just ended: wait
    while background.idle_work_pending:
        assert background.wait_s(last_job_end=float("-inf"), quiet_s=1.0) == 0.0
        background.do_one()
    assert done == ["shape", "shape", "slice", "slice", "slice"]
    assert background.wait_s(float("-inf"), 1.0) is None  # nothing left: the worker sleeps until a job comes

    residency.slices = 2  # a later build (a variant for an override) deferred another move
    assert background.idle_work_pending


def test_a_failed_move_leaves_the_weights_on_the_gpu_and_stops_trying(caplog):
    from service.startup import BackgroundWarmups

    residency = _Residency(slices=3, fail=True)
    background = BackgroundWarmups([], residency=residency)
    background.do_one()
    assert not background.idle_work_pending and residency.calls == ["slice"]
    assert "stay on the GPU" in caplog.text


def test_shape_warm_ups_wait_while_a_variant_is_built_beside_the_serving_thread():
    """A shape's warm-up records CUDA graphs, which must not overlap a build's GPU work
    (engine.records_cuda_graphs): while one runs, idle work moves weights or waits, never warms."""
    from service.startup import PAUSED_POLL_S, BackgroundWarmups

    done: list = []
    building = [True]
    residency = _Residency(slices=1)
    residency.calls = done
    background = BackgroundWarmups([(None, _Shapes(1, done))], residency=residency, recording_paused=lambda: building[0])
    assert background.wait_s(float("-inf"), 1.0) == 0.0  # a slice of the move may go
    background.do_one()
    assert done == ["slice"]
    assert background.wait_s(float("-inf"), 1.0) == PAUSED_POLL_S  # only the shape is left: look again later
    background.do_one()
    assert done == ["slice"]
    building[0] = False
    assert background.wait_s(float("-inf"), 1.0) == 0.0
    background.do_one()
    assert done == ["slice", "shape"] and not background.idle_work_pending
