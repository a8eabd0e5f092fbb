"""Eager references for the fused kernels (stages/kernels/), in float32, and the checks that compare a
kernel's output with them. Shared by the CPU tests (Triton's interpreter) and the GPU tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def bf16_with_outliers(*shape, generator: torch.Generator, outliers: float = 1e-3) -> torch.Tensor:
    """Normal values with a few entries 50-200x larger, as real activations have."""
    x = torch.randn(*shape, generator=generator)
    spikes = torch.rand(*shape, generator=generator) < outliers
    x = torch.where(spikes, x * (50 + 150 * torch.rand(*shape, generator=generator)), x)
    return x.to(torch.bfloat16)


def rowwise_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y / scale clamped, in float32, before the e4m3 cast; scale) with scale = row amax / 448."""
    y = y.float().reshape(-1, y.shape[-1])
    scale = y.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return (y / scale[:, None]).clamp(-FP8_MAX, FP8_MAX), scale


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FLUX's AdaLN: LayerNorm without affine, then * (1 + scale) + shift; x (B, S, C), shift/scale (B, C)."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return normed * (1 + scale.float()[:, None]) + shift.float()[:, None]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float(), approximate="tanh")


def check_fp8_rows(values: torch.Tensor, scale: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A kernel's (values, scale) against `rowwise_reference`: the scales to float32 rounding, and the
    e4m3 codes equal except where the two fp32 computations straddle a rounding boundary (then
    neighbours). `values` is e4m3 (GPU) or the kernel's float32 values before the cast (interpreter)."""
    expected_values, expected_scale = reference
    values = values.reshape(expected_values.shape)
    assert torch.isfinite(scale).all()
    torch.testing.assert_close(scale.float().cpu(), expected_scale.cpu(), rtol=2e-5, atol=0)
    if values.dtype == torch.float32:  # the interpreter's pre-cast values: close in fp32 first
        torch.testing.assert_close(values.cpu(), expected_values.cpu(), rtol=1e-3, atol=2e-2)
    got = values.to(FP8).float().cpu()
    want = expected_values.to(FP8).float().cpu()
    differ = got != want
    assert differ.float().mean().item() < 2e-3, f"{differ.sum().item()} of {differ.numel()} e4m3 codes differ"
    # neighbouring codes: at most one e4m3 step (3 mantissa bits) apart
    step = torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=2**-9)))) / 8
    assert ((got - want).abs() <= step * 1.01 + 2**-9)[differ].all()


def assert_written(tensor: torch.Tensor) -> None:
    """Every element written (outputs are poisoned with NaN before a launch where the dtype allows)."""
    assert not torch.isnan(tensor.float()).any(), "some outputs were never written"


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' apply_rotary_emb (use_real, interleaved pairs) in float32; x (B, S, H, D), cos/sin (S, D)."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-odd, even], dim=-1).flatten(3)
    return x.float() * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rope_tables(seq: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables shaped like FluxPosEmbed's: each angle repeated for the pair it rotates."""
    angles = torch.rand(seq, dim // 2, generator=generator) * 2 * math.pi
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def block_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rowwise_reference over each row's 128-column groups: (values, scales as (groups, rows))."""
    rows, width = y.shape
    values, scale = rowwise_reference(y.float().reshape(rows * width // 128, 128))
    return values.reshape(rows, width), scale.reshape(rows, width // 128).t()


def check_blocks(values: torch.Tensor, scales: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A block-scaled output against block_reference: each 128-column group checked as one row."""
    want_values, want_scales = reference
    rows, width = want_values.shape
    per_group = (want_values.reshape(-1, 128), want_scales.t().reshape(-1))
    check_fp8_rows(values.reshape(rows * width // 128, 128), scales.t().reshape(-1), per_group)
