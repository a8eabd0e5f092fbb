"""Stage 1: the transformer's tanh-approximated GELU computed through its exact sigmoid identity.

    0.5 x (1 + tanh(z)) == x * sigmoid(2 z),   z = sqrt(2/pi) (x + 0.044715 x^3)

The function is the same; what changes is the code Inductor generates. tanh lowers to libdevice's
tanhf, a long instruction sequence, while sigmoid lowers to an exp-based form; the GELU sits in
kernels that also compute the next GEMM's FP8 row-wise quantization, and those kernels are bound by
instructions, not memory. Measured on an H200 (benchmarks/results/nvidia-h200-2026-11-22/gelu_kernels.md,
compiled, bf16 in):

    8192 x 12288                      tanh form   sigmoid form
    GELU + FP8 row-wise quantization  295 us      195 us
    GELU alone (bf16 out)             116 us       97 us

In fp32 both forms are within 5.2e-7 of float64 GELU (tanh form: 4.3e-7). Applied only with compile
(a rule in stages/rules.py): in eager mode the identity runs as several kernels instead of one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Stage

_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh_via_sigmoid(x: torch.Tensor) -> torch.Tensor:
    # In at least float32 whatever the input dtype: Inductor computes in fp32 anyway, and eager bf16 would
    # round every intermediate.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class SigmoidFormGELU(nn.Module):
    """Replaces nn.GELU(approximate="tanh") (the single blocks' act_mlp)."""

    def forward(self, x):
        return gelu_tanh_via_sigmoid(x)


class SigmoidFormGELUProjection(nn.Module):
    """Replaces diffusers' activations.GELU (Linear then tanh GELU, the feed-forward's first layer).
    Keeps the Linear as `.proj`, so the module path (`ff.net.0.proj`) that quantization filters see
    is unchanged."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return gelu_tanh_via_sigmoid(self.proj(x))


def replace_tanh_gelus(model: nn.Module) -> int:
    """Swap every tanh-approximated GELU in `model` for the sigmoid form; returns how many."""
    from diffusers.models.activations import GELU as DiffusersGELU

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GELU) and child.approximate == "tanh":
                setattr(parent, name, SigmoidFormGELU())
            elif isinstance(child, DiffusersGELU) and child.approximate == "tanh":
                setattr(parent, name, SigmoidFormGELUProjection(child.proj))
            else:
                continue
            replaced += 1
    return replaced


class FastGelu(Stage):
    switch = "fast_gelu"
    title = "sigmoid-form GELU"
    summary = "tanh GELU computed as x*sigmoid(2z) (same function; cheaper fused kernels under compile)."

    def apply_execution(self, transformer, config, build):
        build.note(f"transformer: {replace_tanh_gelus(transformer)} tanh GELUs computed in sigmoid form")
