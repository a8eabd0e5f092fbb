"""The server's LoRA capacity, each setting declared once (no torch import: the command line builds
its --help from these fields, as `--lora-<name>` flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from .setting import setting

LORA_DIR_ENV = "FLUX_KONTEXT_LORA_DIR"
LoraMode = Literal["slots", "merge"]
LORA_MODES = get_args(LoraMode)
DEFAULT_LORA_DIR = Path.home() / ".cache" / "flux-kontext-optimized" / "loras"
GROUP = "LoRA adapters (requests name them; files live in one directory)"


@dataclass(frozen=True)
class LoraSettings:
    """How adapters run (`mode`), and the limits. In slots mode, slots and rank decide the LoRA
    variant's extra memory and the width of its extra GEMMs for every request that names an adapter,
    whatever that adapter's own rank (stages/lora_slots.py); in merge mode adapters are merged into
    the weights when a request's adapter set differs from the last one (stages/lora_merge.py)."""

    FLAG_PREFIX = "lora-"

    directory: str | None = setting(
        None,
        f"the adapter directory: NAME.safetensors files (env {LORA_DIR_ENV}; default ~/{DEFAULT_LORA_DIR.relative_to(Path.home())})",
        GROUP,
        flag="--lora-dir",
    )
    mode: LoraMode = setting(
        "slots",
        "slots: adapters run beside the weights, any mix of requests, extra time per step; merge: adapters merged into the "
        "weights, no extra time per step, a restore and merge whenever the adapter set changes",
        GROUP,
    )
    slots: int = setting(2, "adapters one request may combine", GROUP)
    max_rank: int = setting(64, "the largest adapter rank accepted; in slots mode every slot has this rank (memory, GEMM width)", GROUP)
    max_mb: float = setting(2048.0, "adapter file size limit in MiB", GROUP)
    max_loaded: int = setting(
        8, "adapters kept loaded at once (in device memory); a request naming another loads it and unloads the least recently used", GROUP
    )
    preload: tuple[str, ...] = setting(
        tuple,
        "load this adapter from --lora-dir at start (repeatable); warm-up then also compiles the LoRA variant",
        GROUP,
        flag="--preload-lora",
        metavar="NAME",
        repeat=True,
    )

    def __post_init__(self):
        if self.mode not in LORA_MODES:
            raise ValueError(f"LoRA mode {self.mode!r}: choose one of {', '.join(LORA_MODES)}")

    @property
    def merges(self) -> bool:
        return self.mode == "merge"

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 2**20)

    @property
    def resolved_directory(self) -> Path:
        return Path(self.directory or os.environ.get(LORA_DIR_ENV) or DEFAULT_LORA_DIR).expanduser().resolve()
