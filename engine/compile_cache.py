"""Persistent compile artifacts, so that a restarted server reaches ready without recompiling.

Inductor's FX-graph cache and AOTAutograd cache are keyed by graph, inputs and versions; pointing
them at a persistent directory (instead of /tmp) lets a restart skip code generation and tuning;
Dynamo still traces again and CUDA graphs are recorded again. On the H200 (full stack, 1024x1024)
the first edit took 227.6 s cold and 45.5 s with warm caches
(benchmarks/results/nvidia-h200-2026-11-22/startup.md).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "FLUX_KONTEXT_COMPILE_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "flux-kontext-optimized" / "inductor"


def configure_compile_cache(directory: str | os.PathLike | None = None) -> Path:
    """Must run before torch compiles anything; returns the directory in use.

    Precedence: an explicit directory (--compile-cache), then FLUX_KONTEXT_COMPILE_CACHE, then a
    TORCHINDUCTOR_CACHE_DIR the user set, then ~/.cache/flux-kontext-optimized/inductor. Importing
    diffusers already sets TORCHINDUCTOR_CACHE_DIR to torch's default (/tmp/torchinductor_<user>),
    so that value counts as unset: with a plain setdefault the persistent directory was never used
    (found on the H200: a --cache-dir stayed empty)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    preset = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if preset and os.path.abspath(preset) == os.path.abspath(default_cache_dir()):
        preset = None
    chosen = directory or os.environ.get(CACHE_ENV_VAR) or preset or DEFAULT_CACHE_DIR
    path = Path(chosen).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


def active_cache_dir() -> Path | None:
    """The directory configure_compile_cache chose in this process, if it ran."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(chosen) if chosen else None
