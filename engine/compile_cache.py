"""Persistent compile artifacts, so that a restarted server reaches ready without recompiling.

Inductor's FX-graph cache and AOTAutograd cache are keyed by graph, inputs and versions; pointing
them at a persistent directory (instead of /tmp) lets a restart skip code generation. Dynamo still
traces the blocks again (seconds, not a minute).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "FLUX_KONTEXT_COMPILE_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "flux-kontext-optimized" / "inductor"


def configure_compile_cache(directory: str | os.PathLike | None = None) -> Path:
    """Must run before torch compiles anything; returns the directory in use."""
    path = Path(directory or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
