"""Our Flux attention processor computes what diffusers' FluxAttnProcessor computes."""

from __future__ import annotations

import torch

from stages.attention_kernels import sdpa
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
        ours = KontextAttnProcessor(sdpa)(attention, hidden, encoder, None, rope)
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
    ours = KontextAttnProcessor(sdpa)(attention, hidden, encoder, None, None)
    for expected, got in zip(reference, ours):
        assert torch.allclose(expected, got, atol=1e-5, rtol=1e-4)


def test_every_flux_attention_module_is_found(tiny_engine):
    transformer = tiny_engine.loaded.pipe.transformer
    expected = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert len(flux_attention_modules(transformer)) == expected
