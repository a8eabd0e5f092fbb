"""Attention kernels for the joint (text + image) attention, all taking and returning (B, S, H, D).

FlashAttention 3 comes from the packaged `fa3-fwd` wheel (module `fa3_fwd_interface`), whose forward
is already a torch custom op with a fake (meta) implementation, so Inductor keeps a full graph
around it. diffusers' own `_flash_3` backend does not see this wheel (it looks for a distribution
named flash_attn_3), hence our own processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
FA3_MODULE = "fa3_fwd_interface"


def _fa3_forward():
    from fa3_fwd_interface import _flash_attn_forward  # the custom op fa3_fwd::_flash_attn_forward

    return _flash_attn_forward


def fa3_bf16(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    out, *_ = _fa3_forward()(query, key, value, softmax_scale=query.shape[-1] ** -0.5)
    return out


def _fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with one scale per (batch, head): amax over sequence and head dim maps to the fp8 max."""
    scale = x.abs().amax(dim=(1, 3)).float().clamp(min=1e-12) / FP8_E4M3_MAX  # (B, H)
    quantized = (x.float() / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return quantized, scale


def _fp8_bounded(x: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with a scale fixed by a known bound on |x| (qk_norm_bound): no pass over x to find its
    maximum, so under compile the quantization fuses into the kernel that applies RoPE. The clamp
    only guards against the bf16 rounding of values at the bound."""
    scale = (bound.float() / FP8_E4M3_MAX).clamp(min=1e-12)
    quantized = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return quantized, scale.expand(x.shape[0], x.shape[2]).contiguous()  # FA3 takes one descale per (batch, head)


def qk_norm_bound(*norms: torch.nn.Module, head_dim: int) -> torch.Tensor:
    """The largest |value| that FLUX's per-head RMSNorm can output, and RoPE therefore too.

    RMSNorm divides by the root mean square over the head's D values, so |x_i| / rms <= sqrt(D), and
    each output is at most sqrt(D) * max|w|; RoPE rotates pairs of values, which keeps each pair's
    length, so a rotated value is bounded by the same sqrt(D) * max|w|. With a scale fixed by this
    bound, typical values still land in e4m3's normal range, where its relative precision does not
    depend on the scale."""
    weights = [norm.weight.detach().abs().max().float() for norm in norms if getattr(norm, "weight", None) is not None]
    largest = torch.stack(weights).max() if weights else torch.tensor(1.0)
    return largest * head_dim**0.5


def quantize_qkv_fp8(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_bound: torch.Tensor, k_bound: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(q8, k8, v8, q_scale, k_scale, v_scale): e4m3 tensors and the descales FA3 takes, one per batch
    and head. Q and K are scaled by their norm bound (one fused pass, no reduction); V, which no norm
    bounds, by its per-head maximum. Plain tensors, not a container: this runs inside compiled graphs."""
    q8, q_scale = _fp8_bounded(query, q_bound)
    k8, k_scale = _fp8_bounded(key, k_bound)
    v8, v_scale = _fp8_per_head(value)
    return q8, k8, v8, q_scale, k_scale, v_scale


def fa3_on_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor):
    """The FA3 FP8 kernel alone (the roofline times it apart from the quantization, which the
    compiled model fuses into the kernels before it); the output is bf16."""
    out, *_ = _fa3_forward()(q8, k8, v8, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale, softmax_scale=q8.shape[-1] ** -0.5)
    return out


def fa3_fp8(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_bound: torch.Tensor, k_bound: torch.Tensor) -> torch.Tensor:
    """FA3 with FP8 Q/K/V; the output is bf16."""
    return fa3_on_fp8(*quantize_qkv_fp8(query, key, value, q_bound, k_bound)).to(query.dtype)


def sdpa_on_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor):
    """fa3_on_fp8's inputs, dequantized, through exact attention: its CPU reference; bf16 out."""

    def restore(x8, scale):
        return x8.float() * scale[:, None, :, None]

    return sdpa(restore(q8, q_scale), restore(k8, k_scale), restore(v8, v_scale)).to(torch.bfloat16)


def fp8_emulated(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_bound: torch.Tensor, k_bound: torch.Tensor) -> torch.Tensor:
    """fa3_fp8's quantization with exact attention on the dequantized values: the CPU reference for
    what the FP8 scaling alone costs (tests; no FA3 needed)."""
    return sdpa_on_fp8(*quantize_qkv_fp8(query, key, value, q_bound, k_bound)).to(query.dtype)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch's scaled_dot_product_attention in (B, S, H, D): the reference and CPU path."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


@dataclass(frozen=True)
class AttentionKernel:
    run: Callable[..., torch.Tensor]  # (query, key, value[, q_bound, k_bound]) on (B, S, H, D)
    needs_qk_bounds: bool = False


KERNELS = {
    "fa3": AttentionKernel(fa3_bf16),
    "fa3_fp8": AttentionKernel(fa3_fp8, needs_qk_bounds=True),
    "sdpa": AttentionKernel(sdpa),
    "fp8_emulated": AttentionKernel(fp8_emulated, needs_qk_bounds=True),
}
