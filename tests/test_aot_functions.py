"""Ahead-of-time functions in a bundle (stages/precompiled.py, precompile --aot-compile), on the CPU
with a small block (the tiny model's full precompile takes minutes here; its numbers are in
benchmarks/results/aot-functions.md): recorded while compiled modules run, saved in the bundle,
loaded in place of Dynamo, equal to the JIT path, refused with one line when made elsewhere."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from engine.compile_artifacts import bundle_key, load_bundle, load_precompiled, read_manifest, save_bundle
from service.startup import load_compile_artifacts
from stages.compile import configure_dynamo
from stages.config import OptimizationConfig
from stages.precompiled import record


class Block(torch.nn.Module):
    """Shaped like a transformer block's call: a token sequence whose length changes with the image."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, hidden_states, temb):
        return torch.sin(self.linear(hidden_states)) * temb[:, None] + hidden_states


def compiled_blocks() -> list[Block]:
    configure_dynamo()  # hidden_states' sequence is dynamic, as in the compile stage
    blocks = [Block(0), Block(1)]
    for block in blocks:
        block.compile(fullgraph=True)
    return blocks


def inputs(tokens: int):
    generator = torch.Generator().manual_seed(tokens)
    return torch.randn(1, tokens, 16, generator=generator), torch.randn(1, 16, generator=generator)


@pytest.fixture(scope="module")
def aot_bundle(tmp_path_factory, cpu_env):
    """A bundle with the blocks' functions, made by the product's own recording and saving code."""
    blocks = compiled_blocks()
    # torch 2.11's default (the GPU machine's): torch.compile hands out `aot_compile` only when asked
    with torch._dynamo.config.patch(enable_aot_compile=False), torch.no_grad(), record([(block, None) for block in blocks]) as recording:
        for block in blocks:
            block(*inputs(8))
    key = bundle_key(cpu_env, OptimizationConfig(compile=True))
    path = save_bundle(tmp_path_factory.mktemp("aot") / "kontext.zip", key, [], recording=recording)
    return path, key


def loaded_blocks(path, key) -> tuple[list[Block], object]:
    outcome = load_bundle(path, key)
    precompiled, reason = load_precompiled(outcome, key)
    assert precompiled is not None, reason
    blocks = compiled_blocks()
    assert all(precompiled.install(block) for block in blocks)
    return blocks, precompiled


def test_the_bundle_names_its_functions(aot_bundle):
    path, _ = aot_bundle
    aot = read_manifest(path)["aot"]
    assert aot["units"]["Block"]["functions"] == 1  # both blocks, one function: weights are inputs
    assert aot["units"]["Block"]["forward"].startswith("tests.test_aot_functions.Block.forward:") and aot["not_saved"] == {}


def test_the_bundle_carries_the_kernels_its_functions_load_and_installs_them_once(aot_bundle, tmp_path, monkeypatch):
    """Without them each function compiles its kernels when it is loaded: 34.6 s for the tiny model's
    four on this CPU, 2.7 s with them (benchmarks/profile_aot_load.py); 12.3 s on an H100."""
    import zipfile

    from engine import compile_artifacts

    path, key = aot_bundle
    with zipfile.ZipFile(path) as bundle:
        kernels = [name for name in bundle.namelist() if name.startswith("kernels/")]
    assert kernels and all(name.startswith("kernels/inductor/") and name.endswith(".so") for name in kernels)  # the CPU's C++ kernels
    assert read_manifest(path)["kernels"]["files"] == len(kernels)

    fresh = tmp_path / "fresh-cache"
    monkeypatch.setattr(compile_artifacts, "kernel_root", lambda: fresh)
    with zipfile.ZipFile(path) as bundle:
        assert compile_artifacts.install_kernels(bundle) == len(kernels)
        assert compile_artifacts.install_kernels(bundle) == 0  # a kernel already in the cache is kept
    assert sorted(f"kernels/inductor/{file.relative_to(fresh).as_posix()}" for file in fresh.rglob("*.so")) == sorted(kernels)

    climbing = tmp_path / "climbing.zip"
    with zipfile.ZipFile(path) as bundle, zipfile.ZipFile(climbing, "w") as copy:
        for member in bundle.infolist():
            copy.writestr(member, bundle.read(member))
        copy.writestr("kernels/inductor/../../outside.so", b"not a kernel")
    outcome = load_bundle(climbing, key)
    assert not outcome.loaded and "points outside the cache" in outcome.reason and not (tmp_path / "outside.so").exists()


def test_loaded_functions_trace_nothing_and_equal_the_jit_path(aot_bundle):
    path, key = aot_bundle
    blocks, _ = loaded_blocks(path, key)
    graphs, frames = counters["stats"]["unique_graphs"], dict(counters["frames"])
    with torch.no_grad():
        outputs = [block(*inputs(tokens)) for tokens in (8, 13, 40) for block in blocks]  # other lengths: dynamic
    assert counters["stats"]["unique_graphs"] == graphs and dict(counters["frames"]) == frames  # Dynamo never ran
    jit = compiled_blocks()
    with torch.no_grad():
        expected = [block(*inputs(tokens)) for tokens in (8, 13, 40) for block in jit]
    assert all(torch.equal(output, reference) for output, reference in zip(outputs, expected))


def test_a_call_the_functions_do_not_cover_compiles_as_before(aot_bundle, caplog):
    path, key = aot_bundle
    blocks, _ = loaded_blocks(path, key)
    graphs = counters["stats"]["unique_graphs"]
    with torch.enable_grad(), caplog.at_level(logging.INFO, logger="stages.precompiled"):  # recorded under no_grad
        output = blocks[0](*inputs(8))
    eager = Block(0)(*inputs(8))
    assert torch.allclose(output, eager, atol=1e-5) and counters["stats"]["unique_graphs"] > graphs
    assert "do not cover" in caplog.text


def test_a_bundle_for_other_knobs_or_versions_is_refused_in_one_line_and_nothing_is_installed(aot_bundle, tiny_engine, caplog):
    path, key = aot_bundle
    for other in ({**key, "config": {**key["config"], "attention": "fa3"}}, {**key, "packages": {**key["packages"], "torch": "2.11.0"}}):
        assert not load_bundle(path, other).loaded
    # the server's own start-up: the tiny engine's key (compile off) is not the bundle's
    with caplog.at_level(logging.INFO):
        report = load_compile_artifacts(tiny_engine, str(path))
    lines = [record.getMessage() for record in caplog.records if "compile artifacts" in record.getMessage()]
    assert not report["loaded"] and "another setup" in report["reason"] and len(lines) == 1
    assert tiny_engine.variants.precompiled is None and "aot_functions" not in report


def test_functions_made_for_another_config_are_not_handed_to_its_builds(aot_bundle):
    path, key = aot_bundle
    _, precompiled = loaded_blocks(path, key)
    assert precompiled.matches(OptimizationConfig(compile=True))
    assert not precompiled.matches(OptimizationConfig(compile=True, fuse_qkv=True))


class BlockWithAnUnusedFp8Weight(torch.nn.Module):
    """What the fused blocks (stages/fused_blocks.py) look like to aot_compile: the Linear keeps its
    torchao FP8 weight, but the forward multiplies by plain buffers (Fp8Gemm's e4m3 rows and scales)."""

    def __init__(self, forward_uses_fp8_weight: bool):
        super().__init__()
        self.forward_uses_fp8_weight = forward_uses_fp8_weight
        self.projection = torch.nn.Linear(32, 32, bias=False).to(torch.bfloat16)
        self.register_buffer("plain_weight", torch.randn(32, 32).to(torch.bfloat16), persistent=False)

    def forward(self, hidden_states):
        if self.forward_uses_fp8_weight:
            return self.projection(hidden_states)
        return hidden_states @ self.plain_weight.t()


@pytest.mark.parametrize("forward_uses_fp8_weight", [False, True], ids=["plain-buffers", "fp8-weight"])
def test_fp8_weights_stop_a_save_only_where_the_forward_touches_them(forward_uses_fp8_weight):
    # torchao's Float8Tensor cannot be saved with a function's guards (benchmarks/results/aot-functions.md);
    # a module that merely holds one saves, which is why the fused blocks may be saved on Hopper
    torchao = pytest.importorskip("torchao.quantization")
    from stages.precompiled import aot_compile, deserialize, serialize

    block = BlockWithAnUnusedFp8Weight(forward_uses_fp8_weight)
    torchao.quantize_(block, torchao.Float8WeightOnlyConfig(set_inductor_config=False))
    assert type(block.projection.weight).__name__ == "Float8Tensor"
    hidden_states = torch.randn(4, 32).to(torch.bfloat16)
    if forward_uses_fp8_weight:
        with pytest.raises(Exception, match="Float8Tensor"):
            serialize(aot_compile(block, (hidden_states,), {}, None))
        return
    loaded = deserialize(serialize(aot_compile(block, (hidden_states,), {}, None)), None)
    assert torch.equal(loaded(block, hidden_states), block(hidden_states))


def _gated_forward(self, hidden_states, temb):
    """A forward a stage puts on the instance, as stages/fused_blocks.py does for the fused blocks."""
    return torch.cos(self.linear(hidden_states)) * temb[:, None] + hidden_states


def test_a_forward_replaced_on_the_instance_is_saved_and_loaded():
    # torch pickles an instance's bound forward by looking its function's name up on the instance:
    # the fused blocks were not saved on the H100 (2026-12-06) for it
    import types

    from stages.precompiled import aot_compile, deserialize, serialize

    configure_dynamo()
    block = Block(2)
    block.forward = types.MethodType(_gated_forward, block)
    hidden_states, temb = inputs(8)
    with torch.no_grad():
        loaded = deserialize(serialize(aot_compile(block, (hidden_states, temb), {}, None)), None)
        assert torch.allclose(loaded(block, hidden_states, temb), block(hidden_states, temb), atol=1e-6)
    assert block.forward.__func__ is _gated_forward  # the instance keeps its forward
