"""FP8 weight-only T5 text encoder: about half its memory (T5-XXL: 9.5 -> 4.8 GB), applied once when
the model loads (a load-scope knob: requests cannot switch it).

The T5 runs once per request (512 tokens), so its speed hardly matters; its memory does on smaller
cards. Weight-only FP8 keeps activations in bf16: every Linear dequantizes its weight on the fly.
"""

from __future__ import annotations

import torch

from .base import FlagStage, Phase, Requirements
from .tensors import tensor_bytes


def quantize_text_encoder_fp8(text_encoder: torch.nn.Module) -> int:
    """Quantize every Linear's weight to FP8 in place; returns the bytes saved."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    before = sum(tensor_bytes(p) for p in text_encoder.parameters())
    quantize_(text_encoder, Float8WeightOnlyConfig(), filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    return before - sum(tensor_bytes(p) for p in text_encoder.parameters())


class TextEncoderFp8(FlagStage):
    name = "text_encoder_fp8"
    flag = "t5_fp8"
    benchmark_stage = None
    title = "FP8 T5 encoder"
    summary = "FP8 weight-only T5 text encoder (about half its memory), chosen when the model loads."
    requirements = Requirements(cuda=True, packages=("torchao",))
    phases = frozenset({Phase.TEXT_ENCODER})

    def active_detail(self, config, env):
        return "T5 Linears FP8 e4m3 weight-only (torchao)"

    def apply_text_encoder(self, encoder, config, build):
        saved = quantize_text_encoder_fp8(encoder)
        build.note(f"text encoder: T5 FP8 weight-only, {saved / 2**30:.2f} GB saved")
