"""QKV fusion of FP8 weights (stages/qkv_fusion.py): the fused projection holds exactly the three
unfused ones' FP8 rows and row scales, computes what they compute, and the whole FP8-from-load
pipeline runs with it. Formats whose concatenation would not be exact stay unfused, with the reason.

Equality, not closeness, where the same kernel runs: on the CPU the weight-only format dequantizes
and calls a bf16 GEMM, whose output columns do not depend on how many other columns it computes.
Row-wise FP8 GEMMs need FP8 tensor cores, so the CPU checks their weights and the GPU test their outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttention

from engine.engine import KontextEngine
from engine.requests import EditRequest
from stages import registry
from stages.config import OptimizationConfig
from stages.qkv_fusion import drop_unfused_projections, fuse_attention
from tests.conftest import requires_cuda

PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _attention(seed: int = 0) -> FluxAttention:
    """A double block's attention (image and text projections, with biases), small."""
    torch.manual_seed(seed)
    return FluxAttention(query_dim=64, heads=2, dim_head=32, added_kv_proj_dim=64, bias=True, added_proj_bias=True).to(torch.bfloat16)


def _quantize_weights(attn: FluxAttention, granularity, act_quant: bool) -> None:
    """Replace every projection's weight with torchao's Float8Tensor, as the transformer_fp8 formats make
    them (act_quant: the rowwise format's dynamic activations, which torchao's quantize_ only builds on a GPU)."""
    from torchao.quantization import Float8Tensor
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs

    kwargs = QuantizeTensorToFloat8Kwargs(granularity=granularity) if act_quant else None
    for name in (*PARTS["to_qkv"], *PARTS["to_added_qkv"]):
        linear = getattr(attn, name)
        weight = Float8Tensor.from_hp(linear.weight.detach(), granularity=granularity, act_quant_kwargs=kwargs)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)


def test_plain_weights_fuse_as_diffusers_fuses_them():
    ours, theirs = _attention(), _attention()
    theirs.fuse_projections()
    assert fuse_attention(ours) is None and ours.fused_projections
    for fused in PARTS:
        assert torch.equal(getattr(ours, fused).weight, getattr(theirs, fused).weight)
        assert torch.equal(getattr(ours, fused).bias, getattr(theirs, fused).bias)


@pytest.mark.parametrize("act_quant", [False, True], ids=["weight_only", "rowwise"])
def test_row_scaled_fp8_rows_and_scales_are_concatenated_exactly(act_quant):
    from torchao.quantization import PerRow

    attn = _attention()
    _quantize_weights(attn, PerRow(), act_quant)
    fused = copy.deepcopy(attn)
    assert fuse_attention(fused) is None and fused.fused_projections
    for name, parts in PARTS.items():
        weight, originals = getattr(fused, name).weight, [getattr(attn, part).weight for part in parts]
        assert type(weight).__name__ == "Float8Tensor" and not weight.requires_grad
        assert torch.equal(weight.qdata.view(torch.uint8), torch.cat([w.qdata for w in originals]).view(torch.uint8))
        assert torch.equal(weight.scale, torch.cat([w.scale for w in originals]))
        assert torch.equal(weight.dequantize(), torch.cat([w.dequantize() for w in originals]))
        assert weight.act_quant_kwargs == originals[0].act_quant_kwargs and weight.block_size == [1, 64]
        assert torch.equal(getattr(fused, name).bias, torch.cat([getattr(attn, part).bias for part in parts]))


def test_the_fused_weight_only_fp8_projection_computes_the_unfused_ones():
    from torchao.quantization import PerRow

    attn = _attention(1)
    _quantize_weights(attn, PerRow(), act_quant=False)
    fused = copy.deepcopy(attn)
    fuse_attention(fused)
    assert drop_unfused_projections(fused) == 6 and fused.to_q is None
    x, context = torch.randn(1, 300, 64, dtype=torch.bfloat16), torch.randn(1, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fused.to_qkv(x), torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1))
        for unfused_out, fused_out in zip(attn(x, context), fused(x, context)):  # diffusers' processor on both paths
            assert torch.equal(unfused_out, fused_out)


def test_a_scale_shared_across_rows_keeps_the_layer_unfused_and_says_why():
    from torchao.quantization import PerTensor

    attn = _attention()
    _quantize_weights(attn, PerTensor(), act_quant=False)
    reason = fuse_attention(attn)
    assert "share one scale across rows" in reason and "re-quantize" in reason
    assert not attn.fused_projections and attn.to_q is not None and not hasattr(attn, "to_qkv")
    assert drop_unfused_projections(attn) == 0


def test_fp8_from_load_no_longer_skips_qkv_fusion(cpu_env):
    resolved = registry.resolve(OptimizationConfig(transformer_fp8="auto", fuse_qkv=True), cpu_env)
    assert resolved.effective.fuse_qkv and "fuse_qkv" not in resolved.skipped


def test_the_fp8_from_load_pipeline_runs_fused_and_matches_unfused(photo):
    engine = KontextEngine.load("tiny", "cpu", OptimizationConfig(transformer_fp8="weight_only"), max_variants=2)
    request = EditRequest(prompt="make the sky red", image=photo, width=128, height=96, steps=2, seed=5)
    unfused = engine.edit(request)
    fused_config = engine.resolve(OptimizationConfig(transformer_fp8="weight_only", fuse_qkv=True)).effective
    fused = engine.edit(request, fused_config)
    assert "fuse_qkv" in fused.active_stages
    pipe, _, _ = engine.variants.pipeline_for(fused_config)
    attentions = [m for m in pipe.transformer.modules() if isinstance(m, FluxAttention)]
    assert attentions and all(m.fused_projections and m.to_q is None for m in attentions)
    assert all(type(m.to_qkv.weight).__name__ == "Float8Tensor" for m in attentions)
    assert any("row-scaled FP8" in note for note in _weight_notes(engine))
    difference = np.abs(np.asarray(fused.images[0]).astype(int) - np.asarray(unfused.images[0]).astype(int)).max()
    assert difference <= 1, difference  # the same transformer arithmetic; the VAE's fused GEMM may round differently


def _weight_notes(engine) -> list[str]:
    return [note for row in engine.variants.report() if row["kind"] == "weights" for note in row["notes"]]


@requires_cuda
def test_the_fused_rowwise_fp8_gemm_computes_the_unfused_ones_on_a_gpu():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("row-wise FP8 GEMMs need compute capability 8.9+")
    attn = _attention(2).cuda()
    quantize_(attn, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    fused = copy.deepcopy(attn)
    assert fuse_attention(fused) is None
    x = torch.randn(1, 512, 64, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        unfused_out = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1)
        # the same scales and FP8 inputs; a wider GEMM may tile its sums differently: within bf16 rounding
        torch.testing.assert_close(fused.to_qkv(x), unfused_out, rtol=1e-2, atol=1e-2)
