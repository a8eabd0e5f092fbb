"""Attention kernels for the joint (text + image) attention, all taking and returning (B, S, H, D).

FlashAttention 3 comes from the packaged `fa3-fwd` wheel (module `fa3_fwd_interface`), whose forward
is already a torch custom op with a fake (meta) implementation, so Inductor keeps a full graph
around it. diffusers' own `_flash_3` backend does not see this wheel (it looks for a distribution
named flash_attn_3), hence our own processor.
"""

from __future__ import annotations

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


def fa3_fp8(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """FA3 with FP8 Q/K/V and per-head descales; the output is bf16. Under compile the scaling
    fuses into the preceding RoPE/RMSNorm kernels."""
    q8, q_scale = _fp8_per_head(query)
    k8, k_scale = _fp8_per_head(key)
    v8, v_scale = _fp8_per_head(value)
    out, *_ = _fa3_forward()(q8, k8, v8, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale, softmax_scale=query.shape[-1] ** -0.5)
    return out.to(query.dtype)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch's scaled_dot_product_attention in (B, S, H, D): the reference and CPU path."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


KERNELS = {"fa3": fa3_bf16, "fa3_fp8": fa3_fp8, "sdpa": sdpa}
