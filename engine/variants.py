"""Built variants of the model, keyed by the part of the optimization config that changes modules.

Three layers, each cached and shared by the next:

    weight variant     (QKV fusion, quantization)          owns only the tensors it changed
    VAE variant        (fusion, channels_last, compile)    a private copy of the small VAE (1%)
    execution variant  (attention kernel, cache, compile,  a structural clone of a weight variant:
                        CUDA graphs)                       new modules, the same weight tensors

Clones share every tensor they did not change, so a compiled or FA3 variant of the bf16 model costs
no weight memory, and two execution variants on FP8 share one set of FP8 weights. Base weights that
no resident variant references (the bf16 Linear weights behind an FP8 variant, the unfused Q/K/V
behind a fused one) are moved to host memory and brought back only when a variant needs them, so
bf16 and FP8 copies of a layer are never both resident unless both are in use. That move is slow
(16 GB of bf16 weights behind synthetic-full's FP8 variant took 11.7 s on an H100, 2026-12-06, at
the server's first shape, before /ready): with `defer_residency` and room on the GPU for an edit
beside them, a build leaves them in place and `settle_some` moves them a slice at a time, which the
serving thread does when it is idle (service/startup.py, BackgroundWarmups).

A variant may be built on one thread while another runs an edit on a resident one (the service's
build thread): builds take turns under one lock, and a variant in use by an edit is pinned, so it is
neither evicted nor has its base weights moved while it runs (`pipeline_for` pins, `release` unpins).
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from diffusers import FluxKontextPipeline

from stages.base import BuildContext, Phase
from stages.config import OptimizationConfig
from stages.environment import Environment
from stages.lora_merge import MergedLoras
from stages.registry import apply, stages_in
from stages.tensors import leaf_tensors

log = logging.getLogger(__name__)

# Deferring the move to host memory keeps the replaced weights on the GPU through the first edits:
# only with this much free beside them (an edit's working memory with CUDA graphs is 8-10 GiB at
# 1024x1024 on an H100: the large tier's warm-up peak against its load), else they move at once.
DEFER_HEADROOM_GIB = 16.0
SETTLE_SLICE_BYTES = 1 << 30  # one slice of the deferred move: about 0.7 s at the 1.4 GB/s measured
LOCK_WAIT_S = 0.05  # how long a slice waits for a build's locks before it gives its turn back


def phase_key(config: OptimizationConfig, phase: Phase) -> tuple:
    """The config fields that decide what `phase` builds (empty: nothing to build)."""
    return tuple(item for stage in stages_in(phase) if stage.is_requested(config) for item in stage.build_key(config))


def clone_sharing_tensors(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the very same tensor objects."""
    memo = {id(tensor): tensor for tensor in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def storage_bytes(module: torch.nn.Module) -> dict[tuple, int]:
    """(device, data_ptr) -> bytes of every distinct storage a module's tensors live in."""
    sizes = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        for leaf in leaf_tensors(tensor):
            if leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            sizes[(str(leaf.device), storage.data_ptr())] = storage.nbytes()
    return sizes


def added_bytes(module: torch.nn.Module, relative_to: torch.nn.Module) -> int:
    base = storage_bytes(relative_to)
    return sum(size for key, size in storage_bytes(module).items() if key not in base)


@dataclass
class Variant:
    key: tuple
    module: torch.nn.Module
    added_bytes: int
    build_s: float
    notes: list[str]
    uses: int = 0
    pins: int = 0  # edits running on it now: a pinned variant is never evicted
    first_call_s: float | None = None  # the first edit on a compiled variant includes compilation
    parent_key: tuple = ()  # the weight variant an execution variant was cloned from
    # Shapes (engine/sizes.py: edit_shape) the serving thread has run in full at least twice: compiled
    # and with their CUDA graphs recorded, so the background warm-up skips them (engine/warmup.py)
    shapes_run: set = field(default_factory=set)
    # Shapes a request ran once without CUDA graphs (engine.defer_graph_recording): the next edit at
    # one records it, be it the idle warm-up or the shape's second request
    shapes_deferred: set = field(default_factory=set)

    def summary(self, kind: str) -> dict:
        return {
            "kind": kind,
            "key": {name: value for name, value in self.key},
            "added_memory_mb": round(self.added_bytes / 2**20, 1),
            "build_s": round(self.build_s, 3),
            "first_edit_s": None if self.first_call_s is None else round(self.first_call_s, 3),
            "uses": self.uses,
            "notes": list(self.notes),
        }


class VariantCache:
    """Builds variants on first use, keeps the most recent ones, and manages base-weight residency."""

    def __init__(self, pipe: FluxKontextPipeline, device: torch.device, dtype: torch.dtype, env: Environment, max_variants: int = 3):
        self.base = pipe
        self.device, self.dtype, self.env = device, dtype, env
        self.max_variants = max_variants
        self._weights: dict[tuple, Variant] = {}
        self._vaes: OrderedDict[tuple, Variant] = OrderedDict()
        self._executions: OrderedDict[tuple, Variant] = OrderedDict()
        self._offloaded: set[str] = set()  # names of base-transformer tensors moved to host memory
        self.defer_residency = False  # the server sets it before its first shape: see the module docstring
        self.residency_pending = False  # unused base weights left on the GPU for settle_some
        self._deferred_moved = (0, 0.0)  # bytes and seconds of the slices so far, for one log line at the end
        self._report_lock = threading.Lock()  # the dictionaries: /health reads while edits and builds change them
        self._build_lock = threading.RLock()  # one build at a time, whichever thread asks
        # LoRA merge mode's adapters live in the weights the variants share: builds, evictions and
        # residency moves happen only on base values, under its lock (stages/lora_merge.py)
        self.merged = MergedLoras()
        # A bundle's ahead-of-time compiled functions (stages/precompiled.py): the compile stage runs
        # them in the variants built for the config they were made for
        self.precompiled = None

    # -- public -----------------------------------------------------------------------------------
    def pipeline_for(self, config: OptimizationConfig, pin: bool = False) -> tuple[FluxKontextPipeline, Variant, float]:
        """A pipeline that runs `config` (already resolved for this machine), its execution variant
        (with `pin`, pinned until `release`: the engine's edits), and the seconds spent building
        variants for it (0 when everything was cached).

        This is flux-fast's `optimize()` with a cache per part: the transformer's weights (WEIGHTS
        phase: fusion, the split projection, quantization), then its execution (EXECUTION phase: LoRA
        slots, offload, the attention kernel, the cache, trimming, context parallelism, GELU,
        compile, CUDA graphs), then the VAE (VAE phase); stages/registry.py orders the stages within
        a phase. The LOAD phase ran once on the base model, the REQUEST phase runs per edit."""
        start = time.perf_counter()
        exec_key, vae_key = self.execution_key(config), phase_key(config, Phase.VAE)
        execution, vae = self._pinned(exec_key, vae_key)
        built = execution is None or (vae_key and vae is None)
        if built:
            with self._build_lock, self.merged.lock:  # builds, evictions and residency moves see base weights only
                self.merged.restore()
                if self._executions.get(exec_key) is None:
                    weights = self._weight_variant(config, phase_key(config, Phase.WEIGHTS))
                    clone = bool(phase_key(config, Phase.EXECUTION))
                    created = self._build(exec_key, weights.module, config, Phase.EXECUTION, clone=clone)
                    created.parent_key = weights.key
                    with self._report_lock:
                        self._executions[exec_key] = created
                if vae_key and self._vaes.get(vae_key) is None:
                    # The VAE is small (about 1% of the model): a private copy is simpler than tracking in-place conversions.
                    created = self._build(vae_key, self.base.vae, config, Phase.VAE, clone=True, own_tensors=True)
                    with self._report_lock:
                        self._vaes[vae_key] = created
                if execution is not None:
                    self.release(execution)
                execution, vae = self._pinned(exec_key, vae_key)
                with self._report_lock:
                    self._evict()
                self._settle_base_residency()
        pipe = FluxKontextPipeline(
            scheduler=self.base.scheduler,
            vae=vae.module if vae else self.base.vae,
            text_encoder=self.base.text_encoder,
            tokenizer=self.base.tokenizer,
            text_encoder_2=self.base.text_encoder_2,
            tokenizer_2=self.base.tokenizer_2,
            transformer=execution.module,
        )
        pipe.set_progress_bar_config(disable=True)
        if not pin:
            self.release(execution)
        return pipe, execution, (time.perf_counter() - start) if built else 0.0

    def release(self, execution: Variant) -> None:
        """An edit on `execution` is done: it may be evicted again."""
        with self._report_lock:
            execution.pins -= 1

    def find(self, exec_key: tuple) -> Variant | None:
        """The resident execution variant with this key, if any (nothing is built or pinned)."""
        with self._report_lock:
            return self._executions.get(exec_key)

    def is_ready(self, config: OptimizationConfig) -> bool:
        """True when an edit with `config` would neither build a variant nor compile one on its first call."""
        exec_key, vae_key = self.execution_key(config), phase_key(config, Phase.VAE)
        if not exec_key and not vae_key:
            return True  # the base model itself: nothing to build
        with self._report_lock:
            execution = self._executions.get(exec_key)
            vae_present = not vae_key or vae_key in self._vaes
        return execution is not None and vae_present and (not config.compile or execution.first_call_s is not None)

    def _pinned(self, exec_key: tuple, vae_key: tuple) -> tuple[Variant | None, Variant | None]:
        """The resident execution variant (pinned) and VAE variant for these keys, marked as used."""
        with self._report_lock:
            execution, vae = self._executions.get(exec_key), self._vaes.get(vae_key) if vae_key else None
            if execution is not None:
                self._executions.move_to_end(exec_key)
                execution.uses += 1
                execution.pins += 1
            if vae is not None:
                self._vaes.move_to_end(vae_key)
                vae.uses += 1
            return execution, vae

    @staticmethod
    def execution_key(config: OptimizationConfig) -> tuple:
        """The key of the execution variant that runs `config` (it includes its weight variant's)."""
        return phase_key(config, Phase.WEIGHTS) + phase_key(config, Phase.EXECUTION)

    def report(self) -> list[dict]:
        """Every built variant with its memory, build time and uses; safe to call from any thread."""
        with self._report_lock:
            rows = [variant.summary("weights") for variant in self._weights.values()]
            rows += [variant.summary("vae") for variant in self._vaes.values()]
            rows += [variant.summary("execution") for variant in self._executions.values()]
        return rows

    # -- building ---------------------------------------------------------------------------------
    def _build(
        self, key: tuple, source: torch.nn.Module, config: OptimizationConfig, phase: Phase, clone: bool, own_tensors: bool = False
    ) -> Variant:
        """Apply every requested stage's `phase` hook, in registry order, to a clone of `source`.
        With nothing to apply, the variant is `source` itself. `own_tensors` gives the clone private
        copies of every tensor, for stages that convert tensors in place (channels_last)."""
        if not clone:
            return Variant(key, source, 0, 0.0, [])
        start = time.perf_counter()
        allocated_before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        precompiled = self.precompiled if self.precompiled is not None and self.precompiled.matches(config) else None
        build = BuildContext(self.env, self.device, self.dtype, precompiled=precompiled)
        module = copy.deepcopy(source) if own_tensors else clone_sharing_tensors(source)
        apply(phase, module, config, build)
        extra = added_bytes(module, source)
        if self.device.type == "cuda":
            build.note(f"GPU memory allocated by the build: {(torch.cuda.memory_allocated(self.device) - allocated_before) / 2**20:.0f} MB")
        return Variant(key, module, extra, time.perf_counter() - start, build.notes)

    def _weight_variant(self, config: OptimizationConfig, key: tuple) -> Variant:
        variant = self._weights.get(key)
        if variant is None:
            self._restore_base()  # new weights are derived from the full bf16 model
            variant = self._build(key, self.base.transformer, config, Phase.WEIGHTS, clone=bool(key))
            with self._report_lock:
                self._weights[key] = variant
        return variant

    # -- memory -----------------------------------------------------------------------------------
    def _evict(self) -> None:
        """Under the report lock: drop the least recently used execution variants that no edit is
        running on, the VAE variants beyond the limit, and the weights no execution variant uses."""
        while len(self._executions) > self.max_variants:
            key = next((key for key, variant in self._executions.items() if variant.pins == 0), None)
            if key is None:
                break  # every variant is in use: one more until an edit ends
            del self._executions[key]
            log.info("evicting the least recently used variant %s", key)
        while len(self._vaes) > self.max_variants:
            self._vaes.popitem(last=False)
        live = {execution.parent_key for execution in self._executions.values()}
        for weights_key in [key for key in self._weights if key not in live]:
            del self._weights[weights_key]

    def _settle_base_residency(self) -> None:
        """Move base-transformer tensors that no resident variant uses to host memory, now, or later
        in slices (`settle_some`) when deferring and the GPU has room for them beside an edit."""
        if self.device.type != "cuda":
            return
        if self.defer_residency and torch.cuda.mem_get_info(self.device)[0] / 2**30 >= DEFER_HEADROOM_GIB:
            self.residency_pending = True
            return
        started = time.perf_counter()
        moved, _ = self._move_unused_base(None)
        self.residency_pending = False
        if moved:
            seconds = time.perf_counter() - started
            log.info("moved %.1f GB of base weights that no variant uses to host memory in %.1f s", moved / 2**30, seconds)

    def settle_some(self) -> bool:
        """Move one slice of the base weights that no variant uses to host memory (deferred by a build);
        True while some are left. Builds and edits may run between two slices: each slice looks again
        at what the resident variants use."""
        if not self.residency_pending:
            return False
        # The locks a build holds (no build sees base weights half moved). The caller is the serving
        # thread with nothing to do: while a build beside it holds them, it must not wait for the
        # whole build, so it gives up after a moment and is asked again at its next idle moment.
        if not self._build_lock.acquire(timeout=LOCK_WAIT_S):
            return True
        try:
            if not self.merged.lock.acquire(timeout=LOCK_WAIT_S):
                return True
            try:
                started = time.perf_counter()
                moved, left = self._move_unused_base(SETTLE_SLICE_BYTES)
                self.residency_pending = left
            finally:
                self.merged.lock.release()
        finally:
            self._build_lock.release()
        self._deferred_moved = (self._deferred_moved[0] + moved, self._deferred_moved[1] + time.perf_counter() - started)
        if not left:
            moved, seconds = self._deferred_moved
            log.info("moved %.1f GB of base weights that no variant uses to host memory while idle (%.1f s)", moved / 2**30, seconds)
            self._deferred_moved = (0, 0.0)
        return left

    def _move_unused_base(self, limit_bytes: int | None) -> tuple[int, bool]:
        """(bytes moved, whether unused tensors are left on the GPU) after moving at most `limit_bytes`
        (None: all). A slice ends after the tensor that reaches the limit."""
        in_use = set()
        with self._report_lock:
            variants = list(itertools.chain(self._weights.values(), self._executions.values()))
        for variant in variants:
            in_use.update(id(t) for t in itertools.chain(variant.module.parameters(), variant.module.buffers()))
        moved = 0
        for name, owner, attr, tensor in _named_tensor_slots(self.base.transformer):
            if tensor.device.type == "cuda" and id(tensor) not in in_use:
                if limit_bytes is not None and moved >= limit_bytes:
                    return moved, True
                _replace_tensor(owner, attr, tensor.to("cpu"))
                self._offloaded.add(name)
                moved += tensor.numel() * tensor.element_size()
        if moved:
            torch.cuda.empty_cache()
        return moved, False

    def _restore_base(self) -> None:
        if not self._offloaded:
            return  # nothing moved yet (a deferred move may still be pending: what is on the GPU stays)
        for name, owner, attr, tensor in _named_tensor_slots(self.base.transformer):
            if name in self._offloaded:
                _replace_tensor(owner, attr, tensor.to(self.device))
        self._offloaded.clear()


def _named_tensor_slots(model: torch.nn.Module):
    for module_name, module in model.named_modules():
        for attr, tensor in itertools.chain(module._parameters.items(), module._buffers.items()):
            if tensor is not None:
                yield f"{module_name}.{attr}", module, attr, tensor


def _replace_tensor(module: torch.nn.Module, attr: str, tensor: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor
