"""Stage 1: first-block cache (skip the remaining blocks when the first block's residual barely moved)."""

from __future__ import annotations

from .base import FlagStage


class FirstBlockCache(FlagStage):
    name = "first_block_cache"
    flag = "first_block_cache"
    benchmark_stage = 1
    summary = "First-block cache: reuse the other blocks' residual when the first block barely changed."
    not_implemented = "issue: first-block cache on Kontext"
