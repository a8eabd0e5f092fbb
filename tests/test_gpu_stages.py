"""GPU-only paths (FA3, FP8/MX GEMMs, CUDA graphs, weight residency) on a small model with FLUX's
real head size. Skipped, with the reason, on machines without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.requests import EditRequest
from stages.config import OptimizationConfig, cumulative_config
from stages.environment import current_environment
from tests.conftest import image_distance, requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]

# Two heads of 128 (FA3's head sizes) and FLUX's RoPE split of those 128 dimensions.
GPU_TEST_TRANSFORMER = dict(attention_head_dim=128, num_attention_heads=2, axes_dims_rope=(16, 56, 56))


@pytest.fixture(scope="module")
def gpu_engine() -> KontextEngine:
    env = current_environment("cuda:0")
    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0", transformer_overrides=GPU_TEST_TRANSFORMER)
    spec = ModelSpec("tiny-hd128", "tiny", random_weights=True, default_max_area=256 * 256, snap_input_to_kontext_resolutions=False)
    return KontextEngine(LoadedModel(pipe, spec, torch.device("cuda:0"), torch.bfloat16), env, max_variants=8)


def _edit(engine, config, photo, steps=6):
    return engine.edit(EditRequest(prompt="make the sky red", image=photo, seed=3, steps=steps), config)


def test_fa3_kernels_match_sdpa():
    from stages import attention_kernels

    if not current_environment("cuda:0").has_package("fa3_fwd_interface"):
        pytest.skip("the fa3-fwd package is not installed")
    q, k, v = (torch.randn(1, 1536, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = attention_kernels.sdpa(q.float(), k.float(), v.float())

    def rel(x):
        return ((x.float() - reference).norm() / reference.norm()).item()

    assert rel(attention_kernels.fa3_bf16(q, k, v)) < 1e-2
    assert rel(attention_kernels.fa3_fp8(q, k, v, q.abs().amax(), k.abs().amax())) < 8e-2


def test_every_cumulative_stage_runs_and_stays_close(gpu_engine, photo):
    baseline = _edit(gpu_engine, OptimizationConfig(), photo)
    for stage in range(1, 6):
        config = cumulative_config(stage).with_changes(first_block_cache=False)
        first = _edit(gpu_engine, config, photo)
        again = _edit(gpu_engine, config, photo)
        assert not again.variant["first_use"]
        assert again.metadata()["skipped_stages"] == {}, again.metadata()["skipped_stages"]
        rel, _ = image_distance(again.images[0], baseline.images[0])
        limit = 0.25 if stage >= 3 else 0.05  # fp8 GEMMs on random weights move the output most
        assert rel < limit, (stage, rel)
        if stage >= 4:
            assert first.steps == 6  # an explicit step count overrides the solver default


def test_fused_kernels_run_in_the_full_stack_and_move_the_picture_only_by_rounding(gpu_engine, photo):
    config = cumulative_config(5).with_changes(first_block_cache=False)
    fused = _edit(gpu_engine, config, photo)
    assert "fused_kernels" in fused.active_stages, fused.metadata()["skipped_stages"]
    unfused = _edit(gpu_engine, config.with_changes(fused_kernels=False), photo)
    assert "fused_kernels" not in unfused.active_stages
    rel, _ = image_distance(fused.images[0], unfused.images[0])
    assert rel < 0.05, rel  # the same FP8 GEMMs and attention; only intermediate rounding differs
    again = _edit(gpu_engine, config, photo)
    assert not again.variant["first_use"]


def test_quantized_variant_reports_format_and_offloads_bf16_weights(gpu_engine, photo):
    fp8 = _edit(gpu_engine, OptimizationConfig(quantization="auto"), photo)
    report = next(r for r in fp8.stages if r.name == "quantization")
    assert report.active and "FP8" in report.detail and fp8.config.quantization == "fp8"
    # Only the FP8 variant is in use now? Then the bf16 weights it replaced live in host memory.
    gpu_engine.variants._executions.clear()
    gpu_engine.variants._weights.clear()
    _edit(gpu_engine, OptimizationConfig(quantization="fp8", compile=False), photo)
    proj = gpu_engine.loaded.pipe.transformer.single_transformer_blocks[0].proj_mlp.weight
    assert proj.device.type == "cpu"
    _edit(gpu_engine, OptimizationConfig(), photo)  # a bf16 request brings them back
    assert gpu_engine.loaded.pipe.transformer.single_transformer_blocks[0].proj_mlp.weight.device.type == "cuda"


def test_mxfp4_on_hopper_runs_emulated_and_says_so(gpu_engine, photo):
    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("native MX GPU: nothing emulated")
    result = _edit(gpu_engine, OptimizationConfig(quantization="mxfp4"), photo, steps=3)
    report = next(r for r in result.stages if r.name == "quantization")
    assert report.active and "EMULATED" in report.detail
    baseline = _edit(gpu_engine, OptimizationConfig(), photo, steps=3)
    rel, _ = image_distance(result.images[0], baseline.images[0])
    assert 0 < rel < 0.5  # 4-bit weights move the picture, but it is the same picture


def test_cudnn_attention_backend(gpu_engine, photo):
    baseline = _edit(gpu_engine, OptimizationConfig(), photo)
    cudnn = _edit(gpu_engine, OptimizationConfig(attention="cudnn"), photo)
    rel, _ = image_distance(cudnn.images[0], baseline.images[0])
    assert rel < 0.05


def test_cache_with_cuda_graphs_decides_every_step(gpu_engine, photo):
    config = cumulative_config(5).with_changes(cache_threshold=1e-9)
    result = _edit(gpu_engine, config, photo)
    again = _edit(gpu_engine, config, photo)
    assert again.extras["first_block_cache"]["computed"] == 6
    uncached = _edit(gpu_engine, config.with_changes(first_block_cache=False), photo)
    rel, _ = image_distance(again.images[0], uncached.images[0])
    assert rel < 0.02
    assert result.active_stages.count("cuda_graphs") == 1


def test_t5_fp8_weight_only_saves_memory_and_keeps_embeddings():
    from stages.text_encoder_fp8 import quantize_text_encoder_fp8

    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0")
    tokens = pipe.tokenizer_2(["make the sky red"], return_tensors="pt").input_ids.to("cuda:0")
    with torch.no_grad():
        reference = pipe.text_encoder_2(tokens)[0].float()
        saved = quantize_text_encoder_fp8(pipe.text_encoder_2)
        quantized = pipe.text_encoder_2(tokens)[0].float()
    assert saved > 0
    assert ((quantized - reference).norm() / reference.norm()).item() < 0.1
