"""LoRA on the GPU-only stages: FP8 GEMMs (peft's TorchaoLoraLinear around torchao's Linear, no merge;
in merge mode, row-wise FP8 weights re-quantized) and CUDA graphs (slots filled in place, or weights
merged in place, so replays read the new adapter), on a small model with FLUX's head size. Skipped,
with the reason, on machines without a CUDA GPU; the CPU tests cover everything else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.lora_settings import LoraSettings
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.requests import EditRequest, LoraChoice
from stages.config import MAX_PRESET, OptimizationConfig, cumulative_config
from stages.environment import current_environment
from stages.lora import slot_bank
from tests.conftest import image_distance, requires_cuda
from tests.test_gpu_stages import GPU_TEST_TRANSFORMER

pytestmark = [requires_cuda, pytest.mark.gpu]

FULL_STACK = cumulative_config(MAX_PRESET).with_changes(first_block_cache=False)  # as benchmarks/lora_bench.py runs it


def _gpu_engine(directory, mode: str) -> KontextEngine:
    env = current_environment("cuda:0")
    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0", transformer_overrides=GPU_TEST_TRANSFORMER)
    spec = ModelSpec("tiny-hd128", "tiny", random_weights=True, default_max_area=256 * 256, snap_input_to_kontext_resolutions=False)
    settings = LoraSettings(directory=str(directory), mode=mode, max_rank=16, preload=("a", "b"))
    return KontextEngine(LoadedModel(pipe, spec, torch.device("cuda:0"), torch.bfloat16), env, max_variants=8, lora=settings)


@pytest.fixture(scope="module")
def gpu_lora_dir(tmp_path_factory):
    from benchmarks.lora_adapters import block_targets, random_adapter, save_diffusers

    transformer = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0", transformer_overrides=GPU_TEST_TRANSFORMER).transformer
    directory = tmp_path_factory.mktemp("gpu-loras")
    for seed, name in enumerate(("a", "b"), start=1):
        state, config = random_adapter(transformer, 8, seed=seed, targets=block_targets(transformer))
        save_diffusers(directory / f"{name}.safetensors", state, config)
    return directory


@pytest.fixture(scope="module")
def lora_gpu_engine(gpu_lora_dir) -> KontextEngine:
    return _gpu_engine(gpu_lora_dir, "slots")


def _edit(engine, config, photo, *loras):
    request = EditRequest(prompt="make the sky red", image=photo, seed=3, steps=4, loras=tuple(LoraChoice(*c) for c in loras))
    return engine.edit(request, config)


def test_fp8_layers_carry_the_slots_beside_the_fp8_gemm(lora_gpu_engine, photo):
    if current_environment("cuda:0").compute_capability < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")
    fp8 = OptimizationConfig(fuse_qkv=True, quantization="fp8")
    result = _edit(lora_gpu_engine, fp8, photo, ("a", 0.7), ("b", 1.3))
    assert result.config.quantization == "fp8" and "lora" in result.active_stages
    pipe, _, _ = lora_gpu_engine.variants.pipeline_for(result.config)
    layer = pipe.transformer.transformer_blocks[0].attn.to_qkv
    assert type(layer).__name__ == "TorchaoLoraLinear"  # base(x) through the FP8 GEMM, plus the bf16 LoRA path; never merged
    bf16 = _edit(lora_gpu_engine, OptimizationConfig(fuse_qkv=True), photo, ("a", 0.7), ("b", 1.3))
    base = _edit(lora_gpu_engine, OptimizationConfig(fuse_qkv=True), photo)
    assert image_distance(result.images[0], bf16.images[0])[0] < 0.25  # FP8 on random weights moves outputs (test_gpu_stages)
    assert image_distance(bf16.images[0], base.images[0])[0] > 0.01  # and the adapters do something


def test_the_full_stack_switches_adapters_without_compiling_or_leaking(lora_gpu_engine, photo):
    _edit(lora_gpu_engine, FULL_STACK, photo)
    _edit(lora_gpu_engine, FULL_STACK, photo, ("a",))  # compiles and records the LoRA variant
    graphs = counters["stats"]["unique_graphs"]
    outputs = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for loras in [(("a", 0.5),), (("b",),), (("a", 0.7), ("b", 1.3)), (("a", 0.0),), (), (("b",),)]:
            image = np.asarray(_edit(lora_gpu_engine, FULL_STACK, photo, *loras).images[0])
            assert np.array_equal(outputs.setdefault(loras, image), image), loras  # the same request, the same pixels
    assert counters["stats"]["unique_graphs"] == graphs
    assert np.array_equal(outputs[(("a", 0.0),)], outputs[()])
    eager = _edit(lora_gpu_engine, FULL_STACK.with_changes(compile=False, cuda_graphs=False), photo, ("a", 0.7), ("b", 1.3))
    assert image_distance(outputs[(("a", 0.7), ("b", 1.3))], np.asarray(eager.images[0]))[0] < 0.25
    with_slots = lora_gpu_engine.with_lora(FULL_STACK, lora_gpu_engine.loras.pick([LoraChoice("a")]))
    pipe, _, _ = lora_gpu_engine.variants.pipeline_for(lora_gpu_engine.resolve(with_slots).effective)
    assert slot_bank(pipe.transformer).empty


def test_a_replayed_cuda_graph_reads_the_new_adapter(lora_gpu_engine, photo):
    """Switching a and b back and forth under CUDA graphs: each result equals its own first run."""
    first = {loras: np.asarray(_edit(lora_gpu_engine, FULL_STACK, photo, *loras).images[0]) for loras in [(("a",),), (("b",),)]}
    for loras in [(("a",),), (("b",),), (("a",),)]:
        assert np.array_equal(np.asarray(_edit(lora_gpu_engine, FULL_STACK, photo, *loras).images[0]), first[loras])
    assert not np.array_equal(first[(("a",),)], first[(("b",),)])


def test_requests_without_adapters_keep_running_the_variant_without_lora_layers(lora_gpu_engine, photo):
    plain = _edit(lora_gpu_engine, FULL_STACK, photo)
    assert plain.config.lora_slots == 0 and "lora" not in plain.active_stages
    executions = [row for row in lora_gpu_engine.variants.report() if row["kind"] == "execution"]
    lora_rows = [row for row in executions if row["key"].get("lora_slots")]
    assert lora_rows and all(row["added_memory_mb"] > 0 for row in lora_rows)  # slots are the LoRA variant's only extra memory


def test_merge_mode_requantizes_fp8_and_cuda_graphs_replay_the_merged_weights(lora_gpu_engine, gpu_lora_dir, photo):
    """The same full stack in merge mode: FP8 row-wise weights re-quantized with the adapters in them,
    close to the slots' output; no recompile; the base back bit for bit after every change."""
    if current_environment("cuda:0").compute_capability < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")
    merging = _gpu_engine(gpu_lora_dir, "merge")
    base = np.asarray(_edit(merging, FULL_STACK, photo).images[0])
    pipe, _, _ = merging.variants.pipeline_for(merging.resolve(FULL_STACK).effective)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_qkv.weight).__name__ == "Float8Tensor"
    graphs = counters["stats"]["unique_graphs"]
    outputs = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for loras in [(("a", 0.7), ("b", 1.3)), (), (("b",),), (("a", 0.7), ("b", 1.3)), ()]:
            image = np.asarray(_edit(merging, FULL_STACK, photo, *loras).images[0])
            assert np.array_equal(outputs.setdefault(loras, image), image), loras
    assert counters["stats"]["unique_graphs"] == graphs and np.array_equal(outputs[()], base)
    # Against bf16 weights with the adapters beside them, the merge (FP8 rounding of W + BA) deviates
    # about as much as the slots (FP8 rounding of W, BA in bf16): FP8 itself sets both deviations.
    reference = np.asarray(_edit(lora_gpu_engine, OptimizationConfig(fuse_qkv=True), photo, ("a", 0.7), ("b", 1.3)).images[0])
    slots = np.asarray(_edit(lora_gpu_engine, FULL_STACK, photo, ("a", 0.7), ("b", 1.3)).images[0])
    merged = outputs[(("a", 0.7), ("b", 1.3))]
    assert image_distance(merged, reference)[0] <= 1.5 * image_distance(slots, reference)[0] + 0.01
    assert image_distance(merged, base)[0] > 0.01
