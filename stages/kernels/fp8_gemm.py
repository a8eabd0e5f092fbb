"""The FP8 GEMM that takes activations quantized by the fused kernels.

torchao's row-wise Linear quantizes its bf16 input itself, in a pass of its own (or fused by Inductor
into the previous kernel, reading the row twice). With the fused kernels the input is already e4m3
with one scale per row, so the Linear's weight is used directly: `torch._scaled_mm` with row-wise
scales, the call torchao makes (same weights, same fast accumulation), minus the quantization.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tensors import is_quantized


def is_rowwise_fp8(linear: nn.Module) -> bool:
    """A Linear whose weight is torchao's FP8 with one scale per output row and dynamic activations."""
    weight = getattr(linear, "weight", None)
    if not (isinstance(linear, nn.Linear) and weight is not None and is_quantized(weight)):
        return False
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    return (
        qdata is not None
        and qdata.dtype == torch.float8_e4m3fn
        and scale is not None
        and scale.numel() == qdata.shape[0]
        and getattr(weight, "act_quant_kwargs", None) is not None
    )


class Fp8Gemm(nn.Module):
    """One Linear's FP8 weight as plain buffers: the torchao tensor's own e4m3 rows and row scales,
    shared, not copied, so an in-place change of the weight (LoRA merge) is seen here too."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not is_rowwise_fp8(linear):
            raise ValueError(f"{type(linear).__name__} has no row-wise FP8 weight (torchao Float8Tensor with dynamic activations)")
        weight = linear.weight
        self.register_buffer("qdata", weight.qdata, persistent=False)  # (out, in) e4m3
        self.register_buffer("scale", weight.scale.reshape(1, -1), persistent=False)  # (1, out) float32, a view
        self.bias = linear.bias  # the Linear's own bf16 parameter (or None)
        self.fast_accum = bool(weight.mm_config.use_fast_accum) if getattr(weight, "mm_config", None) is not None else True
        self.out_features = linear.out_features

    def operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(e4m3 weight (out, in), its (out,) scales, bias): what the epilogue GEMMs (gemm_epilogue.py) take."""
        return self.qdata, self.scale.reshape(-1), self.bias

    def forward(self, x8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """(rows, in) e4m3 and (rows,) scales -> (rows, out) bf16, bias added."""
        return torch._scaled_mm(
            x8,
            self.qdata.t(),
            scale_a=x_scale.reshape(-1, 1),
            scale_b=self.scale,
            bias=self.bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
        )
