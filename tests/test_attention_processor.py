"""Our Flux attention processor computes what diffusers' FluxAttnProcessor computes."""

from __future__ import annotations

import torch

from stages.attention_kernels import KERNELS, qk_norm_bound
from stages.flux_attention_processor import KontextAttnProcessor, flux_attention_modules


def test_processor_matches_diffusers_in_double_and_single_blocks(tiny_engine):
    transformer = tiny_engine.loaded.pipe.transformer
    torch.manual_seed(0)
    checked = 0
    for block in (transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]):
        attention = block.attn
        hidden = torch.randn(1, 40, attention.query_dim)
        encoder = torch.randn(1, 12, attention.query_dim) if attention.added_kv_proj_dim is not None else None
        tokens = 40 + (12 if encoder is not None else 0)
        rope = transformer.pos_embed(torch.rand(tokens, 3) * 16)
        reference = attention.processor(attention, hidden, encoder, None, rope)
        ours = KontextAttnProcessor(KERNELS["sdpa"])(attention, hidden, encoder, None, rope)
        reference = reference if isinstance(reference, tuple) else (reference,)
        ours = ours if isinstance(ours, tuple) else (ours,)
        for expected, got in zip(reference, ours):
            assert torch.allclose(expected, got, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked == 3  # (image, text) from the double block, one stream from the single block


def test_processor_matches_diffusers_with_fused_projections(tiny_engine):
    import copy

    attention = copy.deepcopy(tiny_engine.loaded.pipe.transformer.transformer_blocks[1].attn)
    hidden, encoder = torch.randn(2, 24, attention.query_dim), torch.randn(2, 8, attention.query_dim)
    reference = attention.processor(attention, hidden, encoder, None, None)
    attention.fuse_projections()
    ours = KontextAttnProcessor(KERNELS["sdpa"])(attention, hidden, encoder, None, None)
    for expected, got in zip(reference, ours):
        assert torch.allclose(expected, got, atol=1e-5, rtol=1e-4)


def test_every_flux_attention_module_is_found(tiny_engine):
    transformer = tiny_engine.loaded.pipe.transformer
    expected = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert len(flux_attention_modules(transformer)) == expected


def test_the_qk_norm_bound_holds_after_rms_norm_and_rope(tiny_engine):
    """FP8 attention scales Q and K by this bound instead of measuring their maximum: no value may
    exceed it, whatever the input and however large the norm's weights."""
    import copy

    transformer = tiny_engine.loaded.pipe.transformer
    attention = copy.deepcopy(transformer.single_transformer_blocks[0].attn)
    seen = {}

    def record(query, key, value, q_bound, k_bound):
        seen.update(q=query.abs().amax() / q_bound, k=key.abs().amax() / k_bound)
        return KERNELS["sdpa"].run(query, key, value)

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        attention.norm_q.weight.copy_(torch.randn(attention.head_dim, generator=generator) * 3)
        attention.norm_k.weight.copy_(torch.randn(attention.head_dim, generator=generator) * 0.1)
        for scale in (1e-3, 1.0, 1e3):
            hidden = torch.randn(1, 64, attention.query_dim, generator=generator) * scale
            rope = transformer.pos_embed(torch.rand(64, 3, generator=generator) * 32)
            KontextAttnProcessor(KERNELS["sdpa"].__class__(record, needs_qk_bounds=True))(attention, hidden, None, None, rope)
            assert seen["q"] <= 1.0 + 1e-5 and seen["k"] <= 1.0 + 1e-5, seen
    assert float(qk_norm_bound(attention.norm_q, head_dim=attention.head_dim)) == float(
        attention.norm_q.weight.abs().max() * attention.head_dim**0.5
    )


def test_fp8_attention_scaling_costs_little_accuracy(tiny_engine):
    """The FP8 path's quantization (static Q/K scales, per-head V scales), with exact attention on the
    dequantized values: the CPU measure of what FP8 e4m3 inputs cost, NaN-free at any input scale."""
    transformer = tiny_engine.loaded.pipe.transformer
    generator = torch.Generator().manual_seed(2)
    for block in (transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]):
        attention = block.attn
        hidden = torch.randn(1, 96, attention.query_dim, generator=generator)
        encoder = torch.randn(1, 16, attention.query_dim, generator=generator) if attention.added_kv_proj_dim is not None else None
        rope = transformer.pos_embed(torch.rand(96 + (16 if encoder is not None else 0), 3, generator=generator) * 16)
        exact = KontextAttnProcessor(KERNELS["sdpa"])(attention, hidden, encoder, None, rope)
        fp8 = KontextAttnProcessor(KERNELS["fp8_emulated"])(attention, hidden, encoder, None, rope)
        for a, b in zip(exact if isinstance(exact, tuple) else (exact,), fp8 if isinstance(fp8, tuple) else (fp8,)):
            assert torch.isfinite(b).all()
            assert ((a - b).norm() / a.norm()).item() < 0.06  # e4m3 keeps 3 mantissa bits: a few percent at most
