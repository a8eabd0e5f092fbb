"""Stage 1: channels_last (NHWC) memory format for the VAE's convolutions, where it measured faster.

Measured on an H200 (FLUX VAE, bf16, 1024x1024; benchmarks/results/nvidia-h200-2026-11-21/step_lab_vae.md):
compiled, NHWC decodes slightly faster than NCHW and encodes the same; eager, NHWC is 40-50% slower.
So on a GPU the stage converts only the decoder, and only when the VAE is compiled (a rule in
stages/rules.py switches it off otherwise, with the reason). On a CPU it applies as asked (the CPU
is not a speed target; this keeps the stage testable there).
"""

from __future__ import annotations

import torch

from .base import Stage


class ChannelsLast(Stage):
    switch = "channels_last"
    title = "channels_last VAE decoder"
    summary = "channels_last memory format for the VAE decoder where it measured faster (compiled, on GPU)."

    def active_detail(self, config, env):
        return "VAE decoder NHWC" if env.has_cuda else "VAE encoder and decoder NHWC"

    def apply_vae(self, vae, config, build):
        if build.env.has_cuda:
            vae.decoder.to(memory_format=torch.channels_last)  # the encoder measured the same either way
            build.note("vae: decoder channels_last")
        else:
            vae.to(memory_format=torch.channels_last)
            build.note("vae: channels_last")
