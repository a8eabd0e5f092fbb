"""Stage 2: FlashAttention 3 for the transformer's joint attention."""

from __future__ import annotations

from .base import Requirements, Stage


class FlashAttention(Stage):
    name = "attention"
    benchmark_stage = 2
    summary = "FlashAttention 3 for the joint attention (cuDNN SDPA fallback)."
    requirements = Requirements(cuda=True, min_compute_capability=(9, 0))
    not_implemented = "issue: the GPU stack"

    def is_requested(self, config):
        return config.attention != "sdpa"

    def switched_off(self, config):
        return config.with_changes(attention="sdpa")
