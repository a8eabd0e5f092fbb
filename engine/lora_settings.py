"""The server's LoRA capacity (no torch import: the command line builds its --help from it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

LORA_DIR_ENV = "FLUX_KONTEXT_LORA_DIR"
LoraMode = Literal["slots", "merge"]
LORA_MODES = get_args(LoraMode)
DEFAULT_LORA_DIR = Path.home() / ".cache" / "flux-kontext-optimized" / "loras"


@dataclass(frozen=True)
class LoraSettings:
    """How adapters run (`mode`), and the limits. In slots mode, slots and rank decide the LoRA
    variant's extra memory and the width of its extra GEMMs for every request that names an adapter,
    whatever that adapter's own rank (stages/lora_slots.py); in merge mode adapters are merged into
    the weights when a request's adapter set differs from the last one (stages/lora_merge.py)."""

    directory: str | None = None  # None: $FLUX_KONTEXT_LORA_DIR, else ~/.cache/flux-kontext-optimized/loras
    mode: LoraMode = "slots"  # slots: any mix of requests, extra cost per step; merge: no cost per step, seconds per change of adapters
    slots: int = 2  # adapters one request may combine
    max_rank: int = 64  # the largest adapter rank accepted, and each slot's rank
    max_bytes: int = 2 * 2**30  # adapter file size limit
    max_loaded: int = 8  # adapters kept loaded at once (each lives in device memory)
    preload: tuple[str, ...] = ()  # loaded when the engine starts

    def __post_init__(self):
        if self.mode not in LORA_MODES:
            raise ValueError(f"LoRA mode {self.mode!r}: choose one of {', '.join(LORA_MODES)}")

    @property
    def merges(self) -> bool:
        return self.mode == "merge"

    @property
    def resolved_directory(self) -> Path:
        return Path(self.directory or os.environ.get(LORA_DIR_ENV) or DEFAULT_LORA_DIR).expanduser().resolve()
