"""Stage 1: fuse the Q, K and V projections of every attention layer into one GEMM.

diffusers' `fuse_qkv_projections()` builds the fused Linear by concatenation but keeps the unfused
ones; on FLUX that is about 4.3 GB of bf16 weights held twice. In a variant we drop the variant's
references to the unfused projections, so they cost memory only while another variant still uses
them (engine/variants.py moves base weights that no variant references off the GPU).

The transformer is fused here rather than by diffusers, because diffusers allocates a bf16
`nn.Linear` and `copy_`s the concatenation into it, which torchao's FP8 weights (FP8 from load,
stages/transformer_fp8.py) cannot do. Concatenating along the output rows is exact for plain
tensors and for torchao's `Float8Tensor` with one scale per row (PerRow: `block_size[0] == 1`; its
`aten.cat` on dim 0 concatenates the e4m3 rows and their scales): each output row keeps its own
bytes and its own scale, and a row-wise FP8 GEMM scales each output column by the activation's
row scale times that weight row's scale alone, so the fused GEMM computes the three unfused ones.
A scale shared across rows (per-tensor or block scales) would need one common scale, i.e. a
re-quantization: such layers stay unfused and the build note says why. Every format this project
loads (rowwise, weight_only) is row-wise. The VAE is always bf16 and uses diffusers' own fusion.

Building the fused variant from an FP8 base holds the FP8 Q/K/V twice for a moment (about 2 GiB
on FLUX.1-Kontext-dev), before any activation exists; the unfused base copies then move to host
memory (engine/variants.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Stage
from .tensors import is_quantized

# Fused module -> the unfused projections it replaces.
_REPLACED = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
# What diffusers' AttentionModuleMixin.fuse_projections (0.42.1) builds for a self-attention
# module such as FluxAttention: the fused Linear, its parts, and the attribute that decides its bias.
_SELF_ATTENTION_FUSIONS = (("to_qkv", "use_bias"), ("to_added_qkv", "added_proj_bias"))
# Float8Tensor attributes that must agree for one fused tensor to stand for all parts
_FLOAT8_SETTINGS = ("block_size", "mm_config", "act_quant_kwargs", "kernel_preference", "dtype")


def drop_unfused_projections(model: torch.nn.Module) -> int:
    """Detach the unfused projections that a fused one replaced; returns how many were dropped."""
    dropped = 0
    for module in model.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused, originals in _REPLACED.items():
            if getattr(module, fused, None) is None:
                continue
            for name in originals:
                if getattr(module, name, None) is not None:
                    setattr(module, name, None)
                    dropped += 1
    return dropped


def row_concat_blocker(weights: list[torch.Tensor]) -> str | None:
    """Why concatenating these weights along their output rows would not be exact, or None when it is."""
    if len({is_quantized(weight) for weight in weights}) > 1:
        return "some of its Q/K/V weights are quantized and some are not"
    if not is_quantized(weights[0]):
        return None if len({weight.dtype for weight in weights}) == 1 else "its Q/K/V weights differ in dtype"
    from torchao.quantization import Float8Tensor

    kind = type(weights[0]).__name__
    if not all(type(weight) is Float8Tensor for weight in weights):
        return f"its weights are torchao {kind}, and only row-scaled Float8Tensor rows concatenate exactly"
    if any(weight.block_size[0] != 1 for weight in weights):
        return (
            f"its FP8 weights share one scale across rows (block size {weights[0].block_size}): "
            "concatenating them would re-quantize under a common scale"
        )
    for setting in _FLOAT8_SETTINGS:
        if any(getattr(weight, setting) != getattr(weights[0], setting) for weight in weights):
            return f"its FP8 Q/K/V weights differ in {setting}"
    return None


def concatenated_linear(parts: list[nn.Linear], bias: bool) -> nn.Linear:
    """One Linear whose output rows are the parts' rows in order. Built on the meta device, so no
    bf16 weight is ever allocated: the concatenated tensors (plain or FP8) are assigned as they are."""
    weight = torch.cat([part.weight for part in parts])
    with torch.device("meta"):
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias:
        fused.bias = nn.Parameter(torch.cat([part.bias for part in parts]), requires_grad=False)
    return fused


@torch.no_grad()
def fuse_attention(attn: nn.Module) -> str | None:
    """Fuse one self-attention module's projections as diffusers does, for plain or row-scaled FP8
    weights. Returns why it stays unfused, or None (fused, or fused already)."""
    if getattr(attn, "fused_projections", False):
        return None
    if getattr(attn, "is_cross_attention", False):
        return "it is cross-attention (to_kv), which FLUX does not have and this fusion does not build"
    planned = []
    for fused, bias_flag in _SELF_ATTENTION_FUSIONS:
        parts = [getattr(attn, name, None) for name in _REPLACED[fused]]
        if any(part is None for part in parts):
            if fused == "to_qkv":
                return "it has no to_q/to_k/to_v"
            continue  # no added projections (single blocks): diffusers builds no to_added_qkv either
        reason = row_concat_blocker([part.weight for part in parts])
        if reason:
            return reason
        planned.append((fused, parts, bool(getattr(attn, bias_flag, False))))
    for fused, parts, bias in planned:
        setattr(attn, fused, concatenated_linear(parts, bias))
    attn.fused_projections = True  # what diffusers' processors read (_get_qkv_projections)
    return None


def fuse_transformer(transformer: nn.Module) -> tuple[int, dict[str, str]]:
    """Every fusable attention module of the transformer fused: (how many, {module: why not} for the rest)."""
    from diffusers.models.attention import AttentionModuleMixin

    for processor in transformer.attn_processors.values():  # diffusers refuses these too (IP adapters)
        if "Added" in type(processor).__name__:
            raise ValueError(f"QKV fusion does not support {type(processor).__name__} (added KV projections)")
    fused, kept = 0, {}
    for name, module in transformer.named_modules():
        if isinstance(module, AttentionModuleMixin) and module._supports_qkv_fusion:
            reason = fuse_attention(module)
            if reason is None:
                fused += 1
            else:
                kept[name] = reason
    return fused, kept


class QkvFusion(Stage):
    switch = "fuse_qkv"
    title = "QKV fusion"
    summary = "Fused Q/K/V projections (one GEMM instead of three) in the transformer and the VAE."

    def apply_weights(self, transformer, config, build):
        fused, kept = fuse_transformer(transformer)
        fp8 = " (row-scaled FP8: rows and row scales concatenated)" if config.transformer_fp8 != "off" else ""
        dropped = drop_unfused_projections(transformer)
        build.note(f"transformer: fused QKV in {fused} attention layers{fp8}, dropped {dropped} unfused projections")
        if kept:
            first = next(iter(kept))
            build.note(f"transformer: {len(kept)} attention layers kept unfused, e.g. {first}: {kept[first]}")

    def apply_vae(self, vae, config, build):
        vae.fuse_qkv_projections()
        build.note(f"vae: fused QKV, dropped {drop_unfused_projections(vae)} unfused projections")
