"""An option: the single block's output projection split in two, so nothing is concatenated.

A FluxSingleTransformerBlock ends with

    proj_out(concat(attention_output, gelu(proj_mlp(x))))      K = 3072 + 12288 = 15360

which makes every step write a 15360-wide concatenation and, with FP8 GEMMs, quantize 15360-wide
rows: on an H200 that fused concat + GELU + row-wise quantization took 0.39 ms per block, 14.8 ms
per step, and 12288-wide rows quantize 2.6x faster than 15360-wide ones
(benchmarks/results/nvidia-h200-2026-11-22/step_lab_profile_fp8.md). Since

    W @ concat(a, m) + b == W[:, :3072] @ a + W[:, 3072:] @ m + b

the stage gives each block two Linears (proj_out_attention, K = 3072, with the bias; proj_out_mlp,
K = 12288) and a forward that adds their outputs. The function is the same; the sums are rounded in a
different order (fp32 on the CPU: about 1e-7), and with FP8 each half gets its own row scales.

The forward is diffusers 0.42.1's FluxSingleTransformerBlock.forward with that one line changed, so
the stage runs only on that diffusers version (tests/test_split_projection.py compares it with the
stock block on every run).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from patches import installed_version

from .base import Availability, Stage

KNOWN_DIFFUSERS = ("0.42.1",)
# Measured on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-23/README.md, full stack,
# compile_tuning fast): 199.7 ms/step without the split, 201.3 and 203.2 ms with it. The predicted
# 5-8 ms did not appear, so the split is an option, off in every preset, until a profile says why.
KNOWN_RESULT = "no faster on an H100"


def _split_output_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = gate.unsqueeze(1) * (self.proj_out_attention(attn_output) + self.proj_out_mlp(mlp_hidden_states))
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def split_single_block_output(block: nn.Module) -> None:
    """Give `block` the two half projections and the forward that uses them (in place)."""
    weight, bias = block.proj_out.weight, block.proj_out.bias
    attention_width = weight.shape[1] - block.mlp_hidden_dim
    factory = {"device": weight.device, "dtype": weight.dtype}
    block.proj_out_attention = nn.Linear(attention_width, weight.shape[0], bias=bias is not None, **factory)
    block.proj_out_mlp = nn.Linear(block.mlp_hidden_dim, weight.shape[0], bias=False, **factory)
    with torch.no_grad():
        block.proj_out_attention.weight.copy_(weight[:, :attention_width])
        block.proj_out_mlp.weight.copy_(weight[:, attention_width:])
        if bias is not None:
            block.proj_out_attention.bias.copy_(bias)
    block.proj_out_attention.requires_grad_(False)
    block.proj_out_mlp.requires_grad_(False)
    block.proj_out = None  # the variant no longer holds the concatenated weight (the base keeps its own)
    block.forward = types.MethodType(_split_output_forward, block)


class SplitProjection(Stage):
    switch = "split_proj_out"
    title = "single-block output projection split (no concat)"
    summary = "The single blocks' output GEMM split into its attention and MLP halves: no concatenation, narrower FP8 rows."

    def availability(self, env):
        version = installed_version("diffusers")
        if version not in KNOWN_DIFFUSERS:
            return Availability(False, f"written for diffusers {', '.join(KNOWN_DIFFUSERS)}'s single block; {version} is installed")
        return Availability(True, detail="proj_out = attention half (K 3072) + MLP half (K 12288)")

    def apply_weights(self, transformer, config, build):
        for block in transformer.single_transformer_blocks:
            split_single_block_output(block)
        build.note(f"single blocks: proj_out split into attention and MLP halves in {len(transformer.single_transformer_blocks)} blocks")
