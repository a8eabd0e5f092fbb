"""Each stage changes what it claims, stays within tolerance of stage 0, and reports honestly."""

from __future__ import annotations

import pytest
import torch

from engine.requests import EditRequest
from stages import registry
from stages.config import OptimizationConfig, cumulative_config
from stages.environment import Environment, GpuInfo
from tests.conftest import image_distance

# fp32 on the CPU: fused GEMMs, NHWC convolutions and Inductor kernels only reorder floating-point sums.
TOLERANCE_REL_L2 = 1e-2
TOLERANCE_MAX_ABS = 4 / 255


def _fake_env(capability=None, packages=(), cxx=True):
    gpu = GpuInfo(0, "Fake GPU", capability, 80 * 2**30) if capability else None
    installed = {name: ("1.0" if name in packages else None) for name in ("torchao", "fa3_fwd_interface", "para_attn", "triton")}
    return Environment("3.11", "2.x", "13.0" if gpu else None, "cuda:0" if gpu else "cpu", gpu, installed, has_cxx_compiler=cxx)


def _edit(engine, image, config, steps=8):
    return engine.edit(EditRequest(prompt="make the sky red", image=image, seed=123, steps=steps), config)


def _transformer_of(engine, config):
    pipe, _, _ = engine.variants.pipeline_for(engine.resolve(config).effective)
    return pipe


def test_registry_order_and_presets():
    names = list(registry.STAGE_NAMES)
    assert names.index("fuse_qkv") < names.index("quantization")  # fuse before quantizing
    assert names.index("attention") < names.index("compile") < names.index("cuda_graphs")
    assert names.index("first_block_cache") < names.index("compile")
    assert cumulative_config(0) == OptimizationConfig()
    five = cumulative_config(5)
    assert five.compile and five.fuse_qkv and five.channels_last and five.first_block_cache and five.cuda_graphs
    assert (five.attention, five.quantization, five.scheduler, five.cache_threshold) == ("fa3_fp8", "auto", "dpmpp_2m_karras", 0.12)
    assert cumulative_config(2).attention == "fa3"  # FP8 attention comes with the FP8 GEMMs, at preset 3
    assert cumulative_config(1).attention == "sdpa" and not cumulative_config(4).cuda_graphs


def test_qkv_fusion_fuses_and_drops_unfused_and_keeps_outputs(tiny_engine, photo):
    pipe = _transformer_of(tiny_engine, OptimizationConfig(fuse_qkv=True))
    for attention in [m for m in pipe.transformer.modules() if hasattr(m, "fused_projections")]:
        assert attention.fused_projections and attention.to_qkv is not None and attention.to_q is None
    vae_attention = pipe.vae.encoder.mid_block.attentions[0]
    assert vae_attention.to_qkv is not None and vae_attention.to_q is None
    base = _edit(tiny_engine, photo, OptimizationConfig())
    fused = _edit(tiny_engine, photo, OptimizationConfig(fuse_qkv=True))
    rel, worst = image_distance(fused.images[0], base.images[0])
    assert rel < TOLERANCE_REL_L2 and worst < TOLERANCE_MAX_ABS
    assert fused.active_stages == ["fuse_qkv"]


def test_channels_last_converts_the_vae_and_keeps_outputs(tiny_engine, photo):
    pipe = _transformer_of(tiny_engine, OptimizationConfig(channels_last=True))
    weight = pipe.vae.decoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    base = _edit(tiny_engine, photo, OptimizationConfig())
    nhwc = _edit(tiny_engine, photo, OptimizationConfig(channels_last=True))
    rel, worst = image_distance(nhwc.images[0], base.images[0])
    assert rel < TOLERANCE_REL_L2 and worst < TOLERANCE_MAX_ABS


def test_sigmoid_form_gelu_is_the_tanh_gelu():
    from stages.fast_gelu import gelu_tanh_via_sigmoid

    x = torch.linspace(-12, 12, 100_001, dtype=torch.float64)
    reference = torch.nn.functional.gelu(x, approximate="tanh")
    assert (gelu_tanh_via_sigmoid(x) - reference).abs().max() < 1e-12  # the identity is exact
    x32 = x.float()
    assert (gelu_tanh_via_sigmoid(x32).double() - reference).abs().max() < 2e-6
    bf16 = gelu_tanh_via_sigmoid(x32.bfloat16())
    assert bf16.dtype == torch.bfloat16 and (bf16.double() - reference).abs().max() < 0.05  # one bf16 rounding at |x| <= 12


def test_fast_gelu_replaces_every_tanh_gelu_only_when_compiled(tiny_engine):
    resolved = registry.resolve(OptimizationConfig(fast_gelu=True), tiny_engine.env)
    assert not resolved.effective.fast_gelu and not resolved.report("fast_gelu").active and "compile" in resolved.report("fast_gelu").reason
    pipe = _transformer_of(tiny_engine, OptimizationConfig(fast_gelu=True, compile=True))
    base = tiny_engine.loaded.pipe.transformer
    assert not any(isinstance(m, torch.nn.GELU) and m.approximate == "tanh" for m in pipe.transformer.modules())
    assert any(isinstance(m, torch.nn.GELU) and m.approximate == "tanh" for m in base.modules())  # the base model is untouched
    x = torch.randn(2, 5, base.inner_dim)
    pairs = [
        (base.transformer_blocks[0].ff, pipe.transformer.transformer_blocks[0].ff),
        (base.single_transformer_blocks[0].act_mlp, pipe.transformer.single_transformer_blocks[0].act_mlp),
    ]
    with torch.no_grad():
        for original, replaced in pairs:
            assert replaced is not original and torch.allclose(replaced(x), original(x), atol=1e-5, rtol=1e-5)
    assert (
        pipe.transformer.transformer_blocks[0].ff.net[0].proj.weight is base.transformer_blocks[0].ff.net[0].proj.weight
    )  # weights shared


@pytest.mark.slow
def test_compile_compiles_blocks_and_vae_and_keeps_outputs(tiny_engine, photo):
    config = OptimizationConfig(compile=True)
    pipe = _transformer_of(tiny_engine, config)
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert pipe.vae.decoder._compiled_call_impl is not None and pipe.vae.encoder._compiled_call_impl is not None
    assert tiny_engine.loaded.pipe.transformer.transformer_blocks[0]._compiled_call_impl is None  # base stays eager
    base = _edit(tiny_engine, photo, OptimizationConfig())
    compiled = _edit(tiny_engine, photo, config)
    rel, worst = image_distance(compiled.images[0], base.images[0])
    assert rel < TOLERANCE_REL_L2 and worst < TOLERANCE_MAX_ABS
    again = _edit(tiny_engine, photo, config)  # the same variant again: nothing rebuilt
    assert not again.variant["first_use"] and again.timings.variant_build_s == 0.0


def test_gpu_stages_say_why_they_cannot_run_on_a_cpu(cpu_env):
    rows = {row["name"]: row for row in registry.stage_status(cpu_env)}
    for name in ("attention", "quantization", "cuda_graphs"):
        assert not rows[name]["available"] and "CUDA GPU" in rows[name]["reason"]
    for name in ("fuse_qkv", "channels_last", "compile"):
        assert rows[name]["available"], rows[name]["reason"]


def test_availability_follows_the_gpu_and_packages():
    ampere = _fake_env((8, 0), packages=("torchao", "fa3_fwd_interface", "triton"))
    attention = registry.get_stage("attention")
    assert "cuDNN SDPA only" in attention.availability(ampere).detail
    config, report = attention.resolve(OptimizationConfig(attention="fa3"), ampere)
    assert config.attention == "cudnn" and report.active and "compute capability 9.0" in report.reason and "8.0" in report.reason
    quantization = registry.get_stage("quantization")
    assert "no FP8" in quantization.availability(ampere).reason
    hopper = _fake_env((9, 0), packages=("torchao", "fa3_fwd_interface", "triton"))
    config, report = quantization.resolve(OptimizationConfig(quantization="auto"), hopper)
    assert config.quantization == "fp8" and "row-wise" in report.detail
    config, report = quantization.resolve(OptimizationConfig(quantization="mxfp4"), hopper)
    assert config.quantization == "mxfp4" and "EMULATED" in report.detail
    config, report = quantization.resolve(OptimizationConfig(quantization="nvfp4"), hopper)
    assert config.quantization == "none" and not report.active and "Blackwell" in report.reason
    config, report = attention.resolve(OptimizationConfig(attention="fa3"), _fake_env((9, 0), packages=("triton",)))
    assert config.attention == "cudnn" and "fa3-fwd" in report.reason
    hopper_bare = _fake_env((9, 0), packages=("triton",))
    assert "torchao" in quantization.availability(hopper_bare).reason


def test_resolve_switches_off_what_cannot_run_and_says_why(cpu_env):
    resolved = registry.resolve(cumulative_config(5), cpu_env)
    assert resolved.effective.attention == "sdpa" and resolved.effective.quantization == "none" and not resolved.effective.cuda_graphs
    assert resolved.effective.compile and resolved.effective.fuse_qkv  # CPU-capable stages stay on
    reasons = resolved.skipped
    assert set(reasons) >= {"attention", "quantization", "cuda_graphs"} and all(reasons.values())


def test_cuda_graphs_step_aside_for_the_diffusers_cache_backend_only():
    hopper = _fake_env((9, 0), packages=("torchao", "fa3_fwd_interface", "triton", "para_attn"))
    five = cumulative_config(5)
    diffusers = registry.resolve(five.with_changes(cache_backend="diffusers"), hopper)
    assert not diffusers.effective.cuda_graphs and diffusers.effective.first_block_cache
    assert "overwritten" in diffusers.skipped["cuda_graphs"]
    para_attn = registry.resolve(five.with_changes(cache_backend="para_attn"), hopper)
    assert para_attn.effective.cuda_graphs and "cuda_graphs" in para_attn.active_stages


def test_unknown_stage_name_is_an_error():
    with pytest.raises(KeyError, match="known stages"):
        registry.get_stage("warp_speed")
