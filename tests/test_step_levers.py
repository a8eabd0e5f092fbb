"""The step's memory-pass levers on the tiny model: each is the same function as the path it replaces
(exactly, or within fp32 rounding where the sums are reordered), switchable, and reported."""

from __future__ import annotations

import numpy as np
import torch

from engine.requests import EditRequest
from stages.config import OptimizationConfig
from stages.split_projection import split_single_block_output


def _pipe(engine, config):
    pipe, _, _ = engine.variants.pipeline_for(engine.resolve(config).effective)
    return pipe


def test_the_split_projection_block_computes_the_stock_block(tiny_engine):
    import copy

    stock = tiny_engine.loaded.pipe.transformer.single_transformer_blocks[0]
    split = copy.deepcopy(stock)
    split_single_block_output(split)
    assert split.proj_out is None and split.proj_out_mlp.in_features == stock.mlp_hidden_dim
    generator = torch.Generator().manual_seed(0)
    hidden, encoder = (
        torch.randn(1, 48, stock.attn.query_dim, generator=generator),
        torch.randn(1, 7, stock.attn.query_dim, generator=generator),
    )
    temb = torch.randn(1, stock.attn.query_dim, generator=generator)
    rope = tiny_engine.loaded.pipe.transformer.pos_embed(torch.zeros(55, 3))
    with torch.no_grad():
        expected = stock(hidden, encoder, temb, image_rotary_emb=rope)
        got = split(hidden, encoder, temb, image_rotary_emb=rope)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_split_variant_edits_like_the_base_and_leaves_the_base_alone(tiny_engine, photo):
    request = EditRequest(prompt="make the sky red", image=photo, seed=5, steps=4)
    base = tiny_engine.edit(request, OptimizationConfig())
    split = tiny_engine.edit(request, OptimizationConfig(split_proj_out=True))
    assert "split_proj_out" in split.active_stages
    difference = np.abs(np.asarray(split.images[0], dtype=int) - np.asarray(base.images[0], dtype=int))
    assert difference.max() <= 1  # fp32 rounding at most flips a pixel's last bit
    assert tiny_engine.loaded.pipe.transformer.single_transformer_blocks[0].proj_out is not None
    blocks = _pipe(tiny_engine, OptimizationConfig(split_proj_out=True)).transformer.single_transformer_blocks
    assert all(block.proj_out is None and block.proj_out_attention is not None for block in blocks)


def test_dropping_the_reference_tokens_before_the_final_projection_is_exact(tiny_engine, photo):
    request = EditRequest(prompt="make the sky red", image=photo, seed=9, steps=3, width=96, height=64)
    seen = []
    transformer = _pipe(tiny_engine, OptimizationConfig(trim_reference_tokens=True)).transformer
    hook = transformer.proj_out.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    try:
        trimmed = tiny_engine.edit(request, OptimizationConfig(trim_reference_tokens=True))
    finally:
        hook.remove()
    base = tiny_engine.edit(request, OptimizationConfig())
    assert seen == [(96 // 16) * (64 // 16)] * 3  # the output's tokens only, every step
    assert np.array_equal(np.asarray(trimmed.images[0]), np.asarray(base.images[0]))
    assert transformer.norm_out.keep is None  # nothing carried into the next request
    text_only = EditRequest(prompt="a red sky", seed=9, steps=2, width=96, height=64)
    a, b = tiny_engine.edit(text_only, OptimizationConfig(trim_reference_tokens=True)), tiny_engine.edit(text_only, OptimizationConfig())
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_lora_adapters_switch_the_split_projection_off_with_the_reason(cpu_env):
    from stages import registry

    resolved = registry.resolve(OptimizationConfig(split_proj_out=True, lora_slots=2, lora_rank=8), cpu_env)
    assert not resolved.effective.split_proj_out and "proj_out" in resolved.skipped["split_proj_out"]
