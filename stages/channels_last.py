"""Stage 1: channels_last (NHWC) memory format for the VAE's convolutions, where it measured faster.

Measured on an H200 (FLUX VAE, bf16, 1024x1024; benchmarks/results/nvidia-h200-2026-11-21/step_lab_vae.md):

    layout   eager encode / decode     compiled encode / decode
    NCHW     47.5 / 86.6 ms            19.3 / 35.0 ms
    NHWC     67.1 / 127.9 ms           19.3 / 33.8 ms

So on a GPU the stage converts only the decoder, and only when the VAE is compiled; in eager mode
NHWC is 40-50% slower and the stage reports itself inactive with that reason. On a CPU it applies
as asked (the CPU is not a speed target; this keeps the stage testable there).
"""

from __future__ import annotations

import torch

from .base import FlagStage, StageReport

EAGER_REASON = "not applied: on this GPU NHWC VAE convolutions measured slower without compile (decode 128 vs 87 ms); turn on compile"


class ChannelsLast(FlagStage):
    name = "channels_last"
    flag = "channels_last"
    benchmark_stage = 1
    summary = "channels_last memory format for the VAE decoder where it measured faster (compiled, on GPU)."

    def resolve(self, config, env):
        config, report = super().resolve(config, env)
        if report.active and env.has_cuda and not config.compile:
            return self.switched_off(config), StageReport(self.name, True, False, reason=EAGER_REASON)
        if report.active:
            report = StageReport(self.name, True, True, detail="VAE decoder NHWC" if env.has_cuda else "VAE encoder and decoder NHWC")
        return config, report

    def apply_vae(self, vae, config, build):
        if build.env.has_cuda:
            vae.decoder.to(memory_format=torch.channels_last)  # the encoder measured the same either way
            build.note("vae: decoder channels_last")
        else:
            vae.to(memory_format=torch.channels_last)
            build.note("vae: channels_last")
