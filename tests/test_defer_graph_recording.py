"""serve --defer-graph-recording: a request at a shape whose CUDA graphs are not recorded yet runs
the compiled blocks without them (patches/cudagraph_trees_bypass.py), and the next edit at that
shape records (engine._defers_recording). On the CPU no variant captures graphs, so these tests
make the engine see a capturing variant (`records_cuda_graphs` as on a GPU) and watch, from inside
the transformer's forward, whether the blocks would run without graphs. The GPU side is
tests/test_defer_graph_recording_gpu.py."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest
from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

from engine.engine import KontextEngine
from engine.requests import BuildInProgress, EditRequest
from engine.warmup import Shape, Warmup
from patches import PatchVersionError, cudagraph_trees_bypass
from service.app import create_app
from service.settings import ServiceSettings
from tests.asgi_client import ready_client

SHAPE = Shape(64, 64, edit=False)


class _Reached(Exception):
    """The manager's own dispatch ran (it reads state the fake manager does not have)."""


class _FakeManager:
    def __init__(self):
        self.calls = []
        self.ids_to_funcs = {7: types.SimpleNamespace(model=lambda inputs: self.calls.append(list(inputs)) or "ran compiled")}

    @property
    def in_recording(self):
        raise _Reached


def test_inside_the_context_a_compiled_graph_runs_its_function_and_the_tree_manager_is_left_alone():
    cudagraph_trees_bypass.install()
    assert cudagraph_trees_bypass.install() == "already installed"
    manager = _FakeManager()
    with cudagraph_trees_bypass.without_cuda_graphs():
        assert CUDAGraphTreeManager._run(manager, [1, 2], 7) == "ran compiled"
    assert manager.calls == [[1, 2]]
    with pytest.raises(_Reached):  # outside it: torch's warm-up / record / replay dispatch, as before
        CUDAGraphTreeManager._run(manager, [1, 2], 7)


def test_the_context_holds_on_its_own_thread_only():
    cudagraph_trees_bypass.install()
    seen = {}
    with cudagraph_trees_bypass.without_cuda_graphs():
        other = threading.Thread(target=lambda: seen.setdefault("other", cudagraph_trees_bypass._bypassing.get()))
        other.start()
        other.join()
        seen["here"] = cudagraph_trees_bypass._bypassing.get()
    assert seen == {"other": False, "here": True}
    assert not cudagraph_trees_bypass._bypassing.get()


def test_an_unknown_torch_is_refused(monkeypatch):
    monkeypatch.setattr(cudagraph_trees_bypass, "installed_version", lambda name: "2.12.1")
    with pytest.raises(PatchVersionError, match="2.11.0, 2.13.0"):
        cudagraph_trees_bypass.install()


def test_without_the_patch_the_context_says_so(monkeypatch):
    monkeypatch.setattr(cudagraph_trees_bypass, "_installed", False)
    with pytest.raises(RuntimeError, match="install"):
        with cudagraph_trees_bypass.without_cuda_graphs():
            pass


@pytest.fixture
def capturing_engine(tiny_engine):
    """The tiny model with variants of its own, seen as capturing CUDA graphs, deferring their
    recording; `bypassed` says, per transformer call, whether the blocks ran without graphs."""
    cudagraph_trees_bypass.install()
    engine = KontextEngine(tiny_engine.loaded, tiny_engine.env, max_variants=8)
    engine.defer_graph_recording = True
    engine.records_cuda_graphs = lambda prepared: (
        engine.shape_of(prepared.request, prepared.width, prepared.height) not in prepared.variant.shapes_run
    )
    engine.bypassed = []
    hook = engine.loaded.pipe.transformer.register_forward_pre_hook(
        lambda module, args: engine.bypassed.append(cudagraph_trees_bypass._bypassing.get())
    )
    yield engine
    hook.remove()


def _request(seed: int = 0) -> EditRequest:
    return EditRequest(prompt="make the sky red", width=SHAPE.width, height=SHAPE.height, steps=2, seed=seed)


def _variant(engine: KontextEngine):
    key, _ = engine.variant_for(_request())
    return engine.variants.find(key)


def test_a_shapes_first_request_runs_without_graphs_and_its_second_records(capturing_engine):
    engine = capturing_engine
    first = engine.edit(_request())
    assert first.variant["cuda_graphs"] == "deferred"
    assert engine.bypassed == [True, True]  # both steps' blocks
    shape = engine.shape_of(_request())
    assert shape in _variant(engine).shapes_deferred and shape not in _variant(engine).shapes_run
    engine.bypassed.clear()
    second = engine.edit(_request())
    assert second.variant["cuda_graphs"] == "recorded" and engine.bypassed == [False, False]
    assert shape in _variant(engine).shapes_run
    assert second.images[0].tobytes() == first.images[0].tobytes()  # the same computation, with or without graphs


def test_a_deferred_request_does_not_wait_for_a_build_where_a_recording_one_would(capturing_engine):
    engine = capturing_engine
    engine._build_lock.acquire()  # a variant is being built beside the serving thread
    try:
        assert engine.edit(_request(), wait_for_build=False).variant["cuda_graphs"] == "deferred"
        with pytest.raises(BuildInProgress):  # the shape's next edit records: it must not capture beside a build
            engine.edit(_request(), wait_for_build=False)
    finally:
        engine._build_lock.release()


def test_the_idle_warm_up_records_a_shape_a_request_ran_without_graphs(capturing_engine):
    engine = capturing_engine
    engine.edit(_request())  # deferred
    warmup = Warmup(engine, shapes=[SHAPE])
    engine.bypassed.clear()
    assert warmup.warm_next()  # not skipped as "a request ran it first": it has no graphs yet
    assert warmup.report.shapes[0]["by"] == "warm-up" and engine.bypassed == [False, False]
    assert engine.shape_of(_request()) in _variant(engine).shapes_run
    assert engine.edit(_request()).variant["cuda_graphs"] is None  # replayed on a GPU; the CPU reports none


def test_the_idle_warm_up_records_shapes_requests_ran_without_graphs_first(capturing_engine):
    engine = capturing_engine
    other = Shape(96, 64, edit=False)
    warmup = Warmup(engine, shapes=[SHAPE, Shape(64, 96, edit=False), other])
    assert warmup.warm_next()  # the first shape, before /ready
    engine.edit(EditRequest(prompt="make the sky red", width=other.width, height=other.height, steps=2, seed=1))  # deferred
    assert warmup.warm_next()
    assert [(row["width"], row["height"]) for row in warmup.report.shapes] == [(64, 64), (96, 64)]
    assert warmup.status()["pending"] == ["64x96 text-to-image"]


def test_a_warm_up_edit_records_at_once(capturing_engine):
    engine = capturing_engine
    assert engine.edit(_request(), warm_up=True).variant["cuda_graphs"] == "recorded"
    assert engine.bypassed == [False, False]


def test_without_the_setting_a_shapes_first_request_records(capturing_engine):
    engine = capturing_engine
    engine.defer_graph_recording = False
    assert engine.edit(_request()).variant["cuda_graphs"] == "recorded" and engine.bypassed == [False, False]


def test_serve_defer_graph_recording_installs_the_patch_and_sets_the_engine(tiny_engine):
    engine = KontextEngine(tiny_engine.loaded, tiny_engine.env, max_variants=8)
    app = create_app(engine, ServiceSettings(warmup=False, defer_graph_recording=True))

    async def scenario():
        async with await ready_client(app) as client:
            return (await client.get("/health")).status_code

    try:
        assert asyncio.run(scenario()) == 200
    finally:
        app.state.service.stop()
    assert engine.defer_graph_recording and cudagraph_trees_bypass.installed()


def test_the_flag_reaches_the_settings():
    from cli.options import build_parser, service_settings_from_args

    assert service_settings_from_args(build_parser().parse_args(["serve", "--defer-graph-recording"])).defer_graph_recording
    assert not service_settings_from_args(build_parser().parse_args(["serve"])).defer_graph_recording
