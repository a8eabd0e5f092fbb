"""The memory plan: the tier chosen for free-memory figures, budgets and compute capabilities, the
footprint estimates behind the thresholds, the rules the memory knobs trigger, and what doctor
tells a user of a 24 GiB Ada card."""

from __future__ import annotations

import argparse

import pytest
import torch

from cli.doctor import render_doctor
from cli.options import add_optimization_options, optimization_config_from_args
from engine.memory_plan import CUDA_GRAPH_POOL_GIB, TIERS, WORKING_GIB, choose_memory_plan, execution_allowance_gib, get_tier
from stages import registry
from stages.config import OptimizationConfig, cumulative_config
from stages.environment import Environment, GpuInfo

GIB = 2**30
PACKAGES = ("torchao", "fa3_fwd_interface", "para_attn", "triton")


def _gpu_env(free_gib, capability=(9, 0), name="Fake GPU", total_gib=80.0, packages=PACKAGES):
    free = None if free_gib is None else int(free_gib * GIB)
    gpu = GpuInfo(0, name, capability, int(total_gib * GIB), free)
    installed = {package: ("1.0" if package in packages else None) for package in PACKAGES}
    return Environment("3.11", "2.x", "13.0", "cuda:0", gpu, installed)


CPU = Environment("3.11", "2.x", None, "cpu", None, {package: "1.0" for package in ("torchao", "para_attn")})
RTX_4090 = _gpu_env(23.4, (8, 9), "NVIDIA GeForce RTX 4090", 23.99, packages=("torchao", "para_attn", "triton"))


@pytest.mark.parametrize(
    "free_gib, tier",
    [
        (79.1, "large"),  # H100 80 GB
        (40.0, "large"),
        (39.4, "medium"),  # A100 40 GB
        (31.4, "medium"),  # 32 GB cards
        (24.0, "medium"),
        (23.4, "small"),  # RTX 4090
        (22.0, "small"),  # L4
        (19.0, "small"),  # 20 GB cards
        (18.9, "tiny"),
        (15.5, "tiny"),  # 16 GB cards: the FP8 transformer alone would not leave room
        (7.6, "tiny"),
    ],
)
def test_the_tier_follows_the_free_memory(free_gib, tier):
    plan = choose_memory_plan(_gpu_env(free_gib))
    assert plan.tier.name == tier and plan.budget_gib == pytest.approx(free_gib, abs=1e-6)
    assert "free memory on Fake GPU" in plan.source


def test_a_budget_overrides_the_free_memory_and_says_so():
    plan = choose_memory_plan(_gpu_env(79.1), budget_gib=22)
    assert plan.tier.name == "small" and plan.source == "--memory-budget"
    beyond = choose_memory_plan(_gpu_env(20.0), budget_gib=30)
    assert beyond.tier.name == "medium" and "more than the 20.0 GiB free" in beyond.source
    with pytest.raises(ValueError, match="positive"):
        choose_memory_plan(_gpu_env(79.1), budget_gib=0)


def test_a_cpu_is_planned_only_when_given_a_budget():
    assert choose_memory_plan(CPU).tier.name == "large" and choose_memory_plan(CPU).budget_gib is None
    plan = choose_memory_plan(CPU, budget_gib=12)
    assert plan.tier.name == "tiny" and "nothing is saved" in plan.source


def test_unknown_free_memory_falls_back_to_the_total():
    assert choose_memory_plan(_gpu_env(None, total_gib=24.0)).tier.name == "medium"


def test_compute_capability_decides_the_fp8_format_and_the_notes():
    small = get_tier("small").changes
    resolve = registry.resolve
    for env, fmt in (
        (RTX_4090, "rowwise"),
        (_gpu_env(79.1, (9, 0)), "rowwise"),
        (_gpu_env(23.0, (8, 6)), "weight_only"),
        (CPU, "weight_only"),
    ):
        resolved = resolve(OptimizationConfig(**small), env)
        assert resolved.effective.transformer_fp8 == fmt, env
    assert "natively" in choose_memory_plan(RTX_4090).notes[0]
    assert "no FP8 tensor cores" in choose_memory_plan(_gpu_env(23.0, (8, 6), "RTX 3090")).notes[0]
    explicit = resolve(OptimizationConfig(transformer_fp8="rowwise"), _gpu_env(23.0, (8, 6), "RTX 3090"))
    assert explicit.effective.transformer_fp8 == "weight_only" and "8.9" in explicit.report("transformer_fp8").reason


# -- the thresholds and the estimates behind them --------------------------------------------------
def test_each_threshold_leaves_room_for_its_tier():
    assert [tier.min_free_gib for tier in TIERS] == sorted((tier.min_free_gib for tier in TIERS), reverse=True)
    for tier in TIERS[:-1]:
        assert tier.estimated_peak_gib <= tier.min_free_gib - 0.5, tier.name  # at least half a GiB of headroom
    assert get_tier("tiny").estimated_peak_gib <= 8, "the tiny tier is for cards of 8 GiB and up"
    for larger, smaller in zip(TIERS, TIERS[1:]):
        assert smaller.estimated_peak_gib < larger.estimated_peak_gib
        assert set(larger.changes.items()) <= set(smaller.changes.items()), "each tier keeps the savings of the one above"


def test_compile_and_cuda_graphs_add_allowances_derived_from_the_activations():
    assert execution_allowance_gib(False, False) == 0
    assert 0 < execution_allowance_gib(True, False) < execution_allowance_gib(True, True) <= WORKING_GIB
    assert CUDA_GRAPH_POOL_GIB < WORKING_GIB, "the graph pool holds the transformer's activations, not the VAE's"
    small = get_tier("small")
    full = small.estimated_peak_with(compile=True, cuda_graphs=True)
    assert full == round(small.estimated_peak_gib + execution_allowance_gib(True, True), 1)
    assert full <= 22.0, "the issue's target: the small tier's full stack under a 22 GiB budget"
    assert choose_memory_plan(RTX_4090).as_dict()["estimated_peak_gib_at_1024_compiled_with_cuda_graphs"] == full


def test_component_sizes_match_the_real_architecture():
    """The estimates' component sizes, recomputed from FLUX.1-Kontext-dev on the meta device."""
    from engine import memory_plan as plan
    from engine.model_builders import build_synthetic_full_pipeline
    from stages.low_precision import MODULATION_SUFFIXES, is_quantized_linear

    pipe = build_synthetic_full_pipeline(device="meta")
    transformer, t5 = pipe.transformer, pipe.text_encoder_2

    def bf16(module):
        return 2 * sum(p.numel() for p in module.parameters()) / GIB

    def fp8(module, quantized):  # FP8 weights plus one float32 scale per row; the rest stays bf16
        q = [m.weight for name, m in module.named_modules() if quantized(m, name)]
        q_numel = sum(w.numel() for w in q)
        return (q_numel + 4 * sum(w.shape[0] for w in q) + 2 * (sum(p.numel() for p in module.parameters()) - q_numel)) / GIB

    def block_linear(module, name):  # within one block: stage 3's Linears, modulation excluded
        return isinstance(module, torch.nn.Linear) and not name.endswith(MODULATION_SUFFIXES)

    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    outside = bf16(transformer) - sum(bf16(block) for block in blocks)
    measured = {
        "TRANSFORMER_BF16_GIB": bf16(transformer),
        "TRANSFORMER_FP8_GIB": fp8(transformer, is_quantized_linear),
        "TRANSFORMER_BLOCK_FP8_GIB": max(fp8(block, block_linear) for block in blocks),
        "TRANSFORMER_OUTSIDE_BLOCKS_GIB": outside,
        "T5_BF16_GIB": bf16(t5),
        "T5_FP8_GIB": fp8(t5, lambda module, name: isinstance(module, torch.nn.Linear)),
        "T5_EMBEDDING_GIB": bf16(t5.shared),
        "T5_LINEAR_FP8_GIB": max(fp8(m, lambda module, name: name == "") for m in t5.modules() if isinstance(m, torch.nn.Linear)),
        "CLIP_GIB": bf16(pipe.text_encoder),
        "VAE_GIB": bf16(pipe.vae),
    }
    for name, value in measured.items():
        assert getattr(plan, name) == pytest.approx(value, rel=0.05), (name, value)


# -- rules the memory knobs trigger ---------------------------------------------------------------
def test_fp8_from_load_replaces_the_stages_that_need_bf16_weights():
    config = cumulative_config(5).with_changes(transformer_fp8="auto")
    resolved = registry.resolve(config, _gpu_env(79.1))
    assert resolved.effective.quantization == "none" and "FP8 from load" in resolved.skipped["quantization"]
    assert resolved.effective.fuse_qkv and "fuse_qkv" not in resolved.skipped, "FP8 rows and row scales concatenate exactly"
    assert resolved.effective.compile and resolved.effective.cuda_graphs, "a resident FP8 transformer keeps compile and graphs"


def test_group_offload_switches_off_what_cannot_follow_moving_weights():
    hopper = _gpu_env(79.1)
    fp8 = registry.resolve(cumulative_config(5).with_changes(**get_tier("tiny").changes), hopper)
    assert not fp8.effective.compile and "swap_tensors" in fp8.skipped["compile"]
    assert not fp8.effective.cuda_graphs and not fp8.effective.fast_gelu and not fp8.effective.channels_last
    bf16 = registry.resolve(cumulative_config(5).with_changes(transformer_offload=True), hopper)
    assert bf16.effective.compile and "without fullgraph" in bf16.report("compile").reason
    assert not bf16.effective.cuda_graphs and "move between host and GPU" in bf16.skipped["cuda_graphs"]


def test_flags_given_explicitly_override_the_plan():
    parser = argparse.ArgumentParser()
    add_optimization_options(parser)
    tier = get_tier("small").changes
    planned = optimization_config_from_args(parser.parse_args([]), has_cuda=True, plan_changes=tier)
    assert planned.text_encoders == "offloaded" and planned.transformer_fp8 == "auto" and planned.compile  # preset 5 on a GPU
    overridden = optimization_config_from_args(parser.parse_args(["--text-encoders", "cpu", "--no-vae-tiling"]), True, tier)
    assert overridden.text_encoders == "cpu" and not overridden.vae_tiling and overridden.t5_fp8


# -- doctor on an Ada card --------------------------------------------------------------------------
def _stage_line(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if f"] {name} " in line)


def test_doctor_tells_a_4090_user_which_stages_they_get():
    plan = choose_memory_plan(RTX_4090)
    text = render_doctor(RTX_4090, cumulative_config(5).with_changes(**plan.changes), plan)
    assert "memory plan   small tier (23.4 GiB: free memory on NVIDIA GeForce RTX 4090)" in text
    assert "FP8 GEMMs run natively" in text
    assert "ON" in _stage_line(text, "transformer_fp8") and "FP8 GEMMs" in _stage_line(text, "transformer_fp8")
    attention = _stage_line(text, "attention")
    assert "ON" in attention and "cuDNN SDPA (fallback)" in attention and "Hopper" in attention
    assert "SKIPPED" in _stage_line(text, "quantization") and "FP8 from load" in _stage_line(text, "quantization")
    for kept in ("compile", "cuda_graphs", "text_encoders", "vae_tiling"):
        assert "ON" in _stage_line(text, kept), kept
    assert "off" in _stage_line(text, "transformer_offload")

    twelve = choose_memory_plan(RTX_4090, budget_gib=12)  # what a 12 GiB Ada card (RTX 4070) gets
    text = render_doctor(RTX_4090, cumulative_config(5).with_changes(**twelve.changes), twelve)
    assert "memory plan   tiny tier" in text and "ON" in _stage_line(text, "transformer_offload")
    assert "SKIPPED" in _stage_line(text, "compile") and "SKIPPED" in _stage_line(text, "cuda_graphs")


def test_doctor_says_what_the_full_stack_costs_on_each_tier():
    plan = choose_memory_plan(RTX_4090)
    text = render_doctor(RTX_4090, cumulative_config(5).with_changes(**plan.changes), plan)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("    ") and "GiB (eager" in line}
    assert list(rows) == [tier.name for tier in TIERS]
    for name in ("large", "medium", "small"):
        peak = get_tier(name).estimated_peak_with(compile=True, cuda_graphs=True)
        assert f"{peak:.1f} GiB" in rows[name] and "compile +" in rows[name] and "CUDA graphs +" in rows[name]
    assert "compile off" in rows["tiny"] and "swap_tensors" in rows["tiny"]  # the rule's reason, as the stage lines give it
    assert "budget: --no-cuda-graphs" not in text
    tight = choose_memory_plan(RTX_4090, budget_gib=19.2)  # a small-tier budget the eager peak fits, the graph pool not
    text = render_doctor(RTX_4090, cumulative_config(5).with_changes(**tight.changes), tight)
    assert "above the 19.2 GiB budget: --no-cuda-graphs" in text
    cpu = render_doctor(CPU, cumulative_config(0), choose_memory_plan(CPU))
    assert "CUDA graphs off); cuda_graphs: needs a CUDA GPU" in cpu
