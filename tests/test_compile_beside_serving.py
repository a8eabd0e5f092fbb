"""patches/compile_beside_serving.py: one thread's FX tracing no longer fails another thread's
compiled calls, a thread that traces still sees its own tracing, and CUDA graph step marks count per
thread that marks them (the two failures of a variant build beside the serving thread on an H100)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch._inductor import cudagraph_trees

import patches
from patches import compile_beside_serving


@pytest.fixture(scope="module", autouse=True)
def installed():
    compile_beside_serving.install()
    assert compile_beside_serving.installed()
    assert compile_beside_serving.install() == "already installed"


def _run_in_thread(work) -> dict:
    seen: dict = {}

    def run():
        try:
            seen["value"] = work()
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            seen["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    return seen


def test_a_compiled_call_runs_while_another_thread_traces():
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager", fullgraph=True)
    tracing, release = threading.Event(), threading.Event()

    class HeldWhileTraced(torch.nn.Module):
        def forward(self, x):
            tracing.set()
            assert release.wait(60)
            return x + 1

    tracer = threading.Thread(target=lambda: torch.fx.symbolic_trace(HeldWhileTraced()))
    tracer.start()
    try:
        assert tracing.wait(60)
        assert torch.fx._symbolic_trace._is_fx_tracing_flag  # the process-wide flag is up while the other thread traces
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))  # unpatched: RuntimeError "Detected that you are using FX"
    finally:
        release.set()
        tracer.join(60)


def test_the_tracing_thread_still_sees_its_own_tracing():
    compiled = torch.compile(lambda x: x - 1, backend="eager", fullgraph=True)

    class CallsCompiledCode(torch.nn.Module):
        def forward(self, x):
            return compiled(x)

    with pytest.raises(RuntimeError, match="symbolically trace a dynamo-optimized function"):
        torch.fx.symbolic_trace(CallsCompiledCode())
    assert not torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def test_step_marks_count_per_thread_that_marks():
    generation = cudagraph_trees.CUDAGraphTreeManager.get_curr_generation
    torch.compiler.cudagraph_mark_step_begin()
    mine = generation()

    def build_thread():
        torch.compiler.cudagraph_mark_step_begin()
        torch.compiler.cudagraph_mark_step_begin()
        return generation()

    theirs = _run_in_thread(build_thread)["value"]
    assert theirs != 0 and generation() == mine  # the other thread's marks left this thread's generation alone
    torch.compiler.cudagraph_mark_step_begin()
    assert generation() == mine - 1
    # a thread that never marked (autograd's, in training) reads the last mark of any thread, as before
    assert _run_in_thread(generation)["value"] == mine - 1


def test_an_unknown_torch_is_refused(monkeypatch):
    monkeypatch.setattr(compile_beside_serving, "installed_version", lambda name: "2.12.1")
    with pytest.raises(patches.PatchVersionError, match="written for torch 2.11.0, 2.13.0"):
        compile_beside_serving.install()
