"""A Flux joint-attention processor with a pluggable attention kernel.

It computes what diffusers' FluxAttnProcessor computes (projections, per-head RMSNorm, text tokens
first, RoPE, attention, output projections), reusing diffusers' own projection and RoPE helpers, but
calls the kernel it was given instead of diffusers' dispatcher. tests/test_attention_processor.py
checks it against FluxAttnProcessor on every run, so a diffusers change that breaks the equivalence
fails loudly.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, _get_qkv_projections

from .attention_kernels import AttentionKernel, qk_norm_bound


class KontextAttnProcessor:
    """Joint attention for FluxAttention modules, with the kernel's `run(q, k, v)` on (B, S, H, D)
    tensors (and the Q/K norm bounds, for kernels that scale by them)."""

    def __init__(self, kernel: AttentionKernel):
        self.kernel = kernel

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        if attention_mask is not None:
            raise ValueError("KontextAttnProcessor does not take attention masks (FLUX.1-Kontext uses none)")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None:  # double-stream block: text tokens go first
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self.kernel.needs_qk_bounds:
            double = attn.added_kv_proj_dim is not None
            q_bound = qk_norm_bound(attn.norm_q, *([attn.norm_added_q] if double else []), head_dim=attn.head_dim)
            k_bound = qk_norm_bound(attn.norm_k, *([attn.norm_added_k] if double else []), head_dim=attn.head_dim)
            hidden_states = self.kernel.run(query, key, value, q_bound.to(query.device), k_bound.to(query.device))
        else:
            hidden_states = self.kernel.run(query, key, value)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:  # single-stream block: the caller projects the output
            return hidden_states
        text_length = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes([text_length, hidden_states.shape[1] - text_length], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def flux_attention_modules(model: torch.nn.Module) -> list[FluxAttention]:
    return [module for module in model.modules() if isinstance(module, FluxAttention)]


def set_attention_kernel(model: torch.nn.Module, kernel: AttentionKernel) -> int:
    modules = flux_attention_modules(model)
    for module in modules:
        module.set_processor(KontextAttnProcessor(kernel))
    return len(modules)
