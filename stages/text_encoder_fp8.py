"""FP8 weight-only T5 text encoder: about half its memory (T5-XXL: 9.5 -> 4.9 GB), applied once when
the model loads (a load-scope knob: requests cannot switch it).

The T5 runs once per request (512 tokens), so its speed hardly matters; its memory does on smaller
cards, and when it is streamed from host memory (text_encoders=offloaded) FP8 halves the bytes moved
per request. Weight-only FP8 keeps activations in bf16: every Linear dequantizes its weight on the
fly, which needs no FP8 tensor cores, so it runs on any GPU and on the CPU.
"""

from __future__ import annotations

import torch

from .base import Requirements, Stage
from .tensors import has_quantized_weights, tensor_bytes


def quantize_text_encoder_fp8(text_encoder: torch.nn.Module) -> int:
    """Quantize every Linear's weight to FP8 in place; returns the bytes saved."""
    from torchao.quantization import quantize_

    before = sum(tensor_bytes(p) for p in text_encoder.parameters())
    quantize_(text_encoder, text_encoder_fp8_config(), filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    return before - sum(tensor_bytes(p) for p in text_encoder.parameters())


def text_encoder_fp8_config():
    from torchao.quantization import Float8WeightOnlyConfig

    # set_inductor_config=False: with torchao's default (True) quantizing T5 switched on Inductor's
    # coordinate-descent tuning for the whole process, so the VAE's dynamic-shape kernels were re-tuned
    # one by one at their first run: the small tier's "stalled compile" of issue 23 (H200: over 5
    # minutes in the VAE encoder's first call, against under a minute without T5 FP8)
    return Float8WeightOnlyConfig(set_inductor_config=False)


class TextEncoderFp8(Stage):
    switch = "t5_fp8"
    title = "FP8 T5 encoder"
    summary = "FP8 weight-only T5 text encoder (about half its memory), chosen when the model loads."
    requirements = Requirements(packages=("torchao",))

    def active_detail(self, config, env):
        return "T5 Linears FP8 e4m3 weight-only (torchao)"

    def apply_load(self, pipe, config, build):
        if has_quantized_weights(pipe.text_encoder_2):
            build.note("text encoder: T5 already FP8 (prequantized checkpoint, or quantized while loading)")
            return
        saved = quantize_text_encoder_fp8(pipe.text_encoder_2)
        build.note(f"text encoder: T5 FP8 weight-only, {saved / 2**30:.2f} GB saved")
