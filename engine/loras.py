"""The engine's LoRA library: adapters loaded by name from one directory, and the adapters a request picks.

    library = LoraLibrary(LoraSettings(directory="~/loras"), transformer, device, dtype)
    library.load("style")                                   # validated, converted, on the device; no model touched
    picked = library.pick([LoraChoice("style", 0.8)])       # ((weights, 0.8),) for the LoRA stage
    library.unload("style")

A request alone is enough: an adapter it names that is a file in the directory but not loaded yet is
loaded when the request picks it (the same checks as an explicit load), and beyond
`--lora-max-loaded` the least recently used adapter the request does not name is unloaded first.
Clients only ever see adapter names: the directory's path is the server's own (its log and `doctor`).

Loading never changes a model: it reads, checks and converts a file (engine/lora_files.py) into
factors kept on the engine's device, and only then replaces the library entry, so a refused file
leaves everything as it was. The model sees adapters only through one request's slots
(stages/lora.py). A request holds the adapter objects it picked, so an unload after it was prepared
cannot pull weights from under it.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch

from stages.lora_weights import LoraFactors, LoraWeights, ScaledLora

from .lora_files import LoraError, adapter_path, available_files, check_against, check_name, linear_shapes, read_safetensors, to_factors
from .lora_settings import LoraSettings
from .requests import LoraChoice

BLOCK_INDEX = re.compile(r"^(\w*transformer_blocks)\.\d+\.")
SWAPS_KEPT = 256  # recent swap times, for /health's median


@dataclass(frozen=True)
class LoadedAdapter:
    weights: LoraWeights
    file: str
    default_scale: float  # used when a request names the adapter without a scale
    nbytes: int
    load_s: float
    ignored_keys: tuple[str, ...]  # e.g. text-encoder LoRA keys: this service adapts the transformer only

    @property
    def name(self) -> str:
        return self.weights.name

    def summary(self) -> dict:
        modules = self.weights.modules
        return {
            "name": self.name,
            "file": self.file,
            "rank": self.weights.rank,
            "layers": len(modules),
            "targets": _target_patterns(modules),
            "memory_mb": round(self.nbytes / 2**20, 2),
            "default_scale": self.default_scale,
            "load_s": round(self.load_s, 3),
            "ignored_keys": len(self.ignored_keys),
        }


def _target_patterns(modules: dict[str, LoraFactors]) -> list[str]:
    """Module names with the block index folded: 'transformer_blocks.*.attn.to_q'."""
    return sorted({BLOCK_INDEX.sub(r"\1.*.", name) for name in modules})


class LoraLibrary:
    def __init__(self, settings: LoraSettings, transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        if settings.slots < 1 or settings.max_rank < 1 or settings.max_loaded < 1:
            raise ValueError("LoRA settings need at least one slot, rank 1 and one loaded adapter")
        self.settings = settings
        self.directory = settings.resolved_directory
        self.device, self.dtype = device, dtype
        self._shapes = linear_shapes(transformer)  # of the base (unfused) model, taken once
        self._adapters: dict[str, LoadedAdapter] = {}
        self._last_used: dict[str, float] = {}  # name -> when a request last picked it (or it was loaded)
        self._swaps: deque[float] = deque(maxlen=SWAPS_KEPT)
        self._swap_count = 0
        self._lock = threading.Lock()  # /health and GET /v1/loras read while the GPU worker loads
        self._first_use = threading.Lock()  # one load on first use at a time (a variant build may pick too)

    # -- loading ------------------------------------------------------------------------------------
    def load(self, name: str, file: str | None = None, default_scale: float = 1.0) -> LoadedAdapter:
        """Load (or reload) adapter `name` from `file` in the LoRA directory (default: `name`.safetensors)."""
        started = time.perf_counter()
        check_name(name)
        if not math.isfinite(default_scale):
            raise LoraError(f"scale {default_scale} is not a finite number", field="scale")
        with self._lock:
            full = name not in self._adapters and len(self._adapters) >= self.settings.max_loaded
        if full:
            raise LoraError(
                f"{self.settings.max_loaded} adapters are already loaded (serve --lora-max-loaded); unload one first", status=409
            )
        path = adapter_path(self.directory, file or name)
        tensors, metadata = read_safetensors(path, self.settings.max_bytes)
        modules, ignored = to_factors(tensors, metadata)
        check_against(modules, self._shapes, self.settings.max_rank)
        stored = {
            module: LoraFactors(f.down.to(self.device, self.dtype), f.up.to(self.device, self.dtype)) for module, f in modules.items()
        }
        nbytes = sum(f.down.nbytes + f.up.nbytes for f in stored.values())
        adapter = LoadedAdapter(
            LoraWeights(name, stored), os.path.basename(path), float(default_scale), nbytes, time.perf_counter() - started, tuple(ignored)
        )
        with self._lock:
            self._adapters[name] = adapter  # replaces an older version of the same name in one step
            self._last_used[name] = time.monotonic()
        return adapter

    def unload(self, name: str) -> LoadedAdapter:
        with self._lock:
            adapter = self._adapters.pop(name, None)
            self._last_used.pop(name, None)
        if adapter is None:
            raise LoraError(f"adapter {name!r} is not loaded", status=404)
        return adapter

    def preload(self) -> list[LoadedAdapter]:
        return [self.load(name) for name in self.settings.preload]

    # -- requests -------------------------------------------------------------------------------------
    def check(self, choices: Sequence[LoraChoice]) -> None:
        """What a request's adapters must satisfy before anything is loaded or run: how many, each named
        once, each known (loaded, or a file in the directory: 404 otherwise), finite scales."""
        if len(choices) > self.settings.slots:
            raise LoraError(
                f"{len(choices)} adapters named; this server combines at most {self.settings.slots} per request (serve --lora-slots)",
                field="loras",
            )
        seen = set()
        for index, choice in enumerate(choices):
            field = f"loras[{index}]"
            if choice.name in seen:
                raise LoraError(f"adapter {choice.name!r} is named twice", field=f"{field}.name")
            seen.add(choice.name)
            with self._lock:
                loaded = choice.name in self._adapters
            if not loaded and choice.name not in self.available():
                message = f"no adapter {choice.name!r}: it is neither loaded nor a file in the server's LoRA directory"
                raise LoraError(message, status=404, field=f"{field}.name")
            if choice.scale is not None and not math.isfinite(choice.scale):
                raise LoraError(f"scale {choice.scale} is not a finite number", field=f"{field}.scale")

    def pick(self, choices: Sequence[LoraChoice], loads: list | None = None) -> tuple[ScaledLora, ...]:
        """A request's adapters with their scales, checked and loaded on first use (each load appended to
        `loads` as (name, seconds)); scale-0 entries are dropped (they change nothing)."""
        self.check(choices)
        picked = []
        for index, choice in enumerate(choices):
            with self._lock:
                adapter = self._adapters.get(choice.name)
                self._last_used[choice.name] = time.monotonic()
            if adapter is None:
                adapter = self._load_on_first_use(choice.name, keep={other.name for other in choices}, field=f"loras[{index}].name")
                if loads is not None:
                    loads.append((adapter.name, adapter.load_s))
            scale = adapter.default_scale if choice.scale is None else float(choice.scale)
            if not math.isfinite(scale):
                raise LoraError(f"scale {scale} is not a finite number", field=f"loras[{index}].scale")
            if scale != 0.0:
                picked.append((adapter.weights, scale))
        return tuple(picked)

    def _load_on_first_use(self, name: str, keep: set[str], field: str) -> LoadedAdapter:
        """Load `name` for a request, unloading the least recently used adapters it does not name
        while the library is full; a refused file is the request's error, at the field that named it."""
        with self._first_use:
            with self._lock:
                if name in self._adapters:  # another request loaded it meanwhile
                    return self._adapters[name]
                while len(self._adapters) >= self.settings.max_loaded:
                    spare = [other for other in self._adapters if other not in keep]
                    if not spare:
                        break  # the request names more adapters than fit: the load below says so (409)
                    evicted = min(spare, key=lambda other: self._last_used.get(other, 0.0))
                    del self._adapters[evicted]
                    self._last_used.pop(evicted, None)
            try:
                return self.load(name)
            except LoraError as refused:
                refused.field = refused.field or field
                raise

    def record_swap(self, seconds: float) -> None:
        with self._lock:
            self._swaps.append(seconds)
            self._swap_count += 1

    # -- reporting ------------------------------------------------------------------------------------
    def available(self) -> list[str]:
        return available_files(self.directory)

    def loaded(self) -> list[LoadedAdapter]:
        with self._lock:
            return list(self._adapters.values())

    def report(self, with_files: bool = True) -> dict:
        """Settings, loaded adapters and swap times; `with_files` adds the adapter files in the directory,
        by name (GET /v1/loras, behind the API key; /health, which answers anyone, leaves them out)."""
        loaded = self.loaded()
        with self._lock:
            swaps, count = list(self._swaps), self._swap_count
        settings = self.settings
        files = {"available": self.available()} if with_files else {}  # names only: the directory's path stays on the server
        return {
            **files,
            "mode": settings.mode,
            "slots": settings.slots,
            "max_rank": settings.max_rank,
            "max_mb": round(settings.max_bytes / 2**20, 1),
            "max_loaded": settings.max_loaded,
            "loaded": [adapter.summary() for adapter in loaded],
            "loaded_memory_mb": round(sum(adapter.nbytes for adapter in loaded) / 2**20, 2),
            "swaps": {
                "count": count,
                "last_ms": round(swaps[-1] * 1e3, 3) if swaps else None,
                "median_ms": round(statistics.median(swaps) * 1e3, 3) if swaps else None,
            },
        }
