"""Stage 1: channels_last (NHWC) memory format for the VAE's convolutions.

Whether NHWC is faster depends on the GPU, the cuDNN version and whether the VAE is compiled; the
benchmark measures it rather than assuming it (eager bf16 on an H200 measured it slower).
"""

from __future__ import annotations

import torch

from .base import FlagStage


class ChannelsLast(FlagStage):
    name = "channels_last"
    flag = "channels_last"
    benchmark_stage = 1
    summary = "channels_last memory format for the VAE convolutions."

    def apply_vae(self, vae, config, build):
        vae.to(memory_format=torch.channels_last)
        build.note("vae: channels_last")

    def touches_vae(self, config):
        return config.channels_last
