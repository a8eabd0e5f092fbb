"""The Kontext editing engine: one call runs an edit with an optimization config.

    engine = KontextEngine.load("tiny", device="cpu")
    result = engine.edit(EditRequest(prompt="make the sky red", image=img), OptimizationConfig(compile=True))

An edit has three parts. `prepare` resolves the config against this machine (unavailable stages are
switched off and reported, load-scope knobs are held at what the model was loaded with), fetches or
builds the matching variant (engine/variants.py: the stages' WEIGHTS, EXECUTION and VAE phases), and
runs the stages' REQUEST phase (the sampler, the request's LoRA adapters from the engine's library,
the cache state); `denoise` runs the pipeline to latents, with timing marks around text encoding,
VAE encoding and every step; `decode` turns the latents into pictures. Stages act only through
`stages.registry.apply`, phase by phase: LOAD here once, the build phases in the variant cache, and
REQUEST in `prepare`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from stages.base import BuildContext, Phase, RequestContext
from stages.config import KNOBS, LOAD_FIELDS, OptimizationConfig
from stages.environment import Environment, current_environment
from stages.lora_merge import MergeRefused
from stages.registry import ResolvedConfig, apply, get_stage, resolve, stage_status
from stages.tensors import has_quantized_weights
from stages.transformer_fp8 import format_of

from .checkpoints import check_usable
from .loading import LoadedModel, LoadSettings, load_model
from .lora_files import LoraError
from .lora_settings import LoraSettings
from .loras import LoraLibrary
from .memory_plan import MemoryPlan
from .pictures import conditioning_pixels, pictures_from_pixels
from .requests import BuildInProgress, EditCancelled, EditRequest, EditResult
from .serving_priority import serving_thread_first
from .sizes import edit_shape, output_size
from .text_encoder_graphs import TextEncoderGraphs, use_graphs
from .timing import Clock, EditTimer, instrumented
from .variants import Variant, VariantCache

log = logging.getLogger(__name__)


LOAD_TIME = "chosen when the model loads; requests cannot change it"
# A warm-up edit (engine/warmup.py, build_variant) runs two transformer calls per shape: cudagraph
# trees run a new shape once before they record it.
WARMUP_STEPS = 2
# A build beside the serving thread (build_variant) compiles with one step: CUDA graph trees are per
# thread, so graphs that a second step would record there would never be replayed; the serving
# thread records its own at its first edit on the variant.
BUILD_STEPS = 1


@dataclass
class PreparedEdit:
    """Everything decided before the GPU work starts."""

    request: EditRequest
    resolved: ResolvedConfig
    pipe: FluxKontextPipeline
    variant: Variant
    build_s: float
    stage_state: RequestContext
    steps: int
    seed: int
    width: int
    height: int
    image: Image.Image | None
    lora_load_s: float = 0.0  # adapters the request named, loaded on first use


class KontextEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        env: Environment,
        default_config: OptimizationConfig | None = None,
        max_variants: int = 3,
        lora: LoraSettings | None = None,
        memory_plan: MemoryPlan | None = None,
    ):
        self.loaded = loaded
        self.env = env
        self.memory_plan = memory_plan  # the tier the load knobs came from, when one was chosen (cli/commands.py)
        self.default_config = _as_loaded(default_config or OptimizationConfig(), loaded, env)
        self.variants = VariantCache(loaded.pipe, loaded.device, loaded.dtype, env, max_variants=max_variants)
        self.clock = Clock(loaded.device)
        self._lock = threading.Lock()  # one edit at a time: variants and the GPU are shared state
        # one background build at a time (build_variant); the serving thread also holds it while an
        # edit records CUDA graphs (records_cuda_graphs): a capture must not overlap a build
        self._build_lock = threading.Lock()
        self._loaded_knobs: dict = {}  # load-scope knobs as the model was loaded: every request runs with these
        # A request at a shape not recorded yet runs without CUDA graphs instead of recording them in
        # its second step (`_defers_recording`); serve --defer-graph-recording sets it (service/startup.py)
        self.defer_graph_recording = False
        self._apply_load_stages()
        self.text_encoder_graphs = self._graphed_text_encoders()
        self.loras = LoraLibrary(lora or LoraSettings(), loaded.pipe.transformer, loaded.device, loaded.dtype)
        self.loras.preload()

    @classmethod
    def load(
        cls,
        model: str,
        device: str | None = None,
        default_config: OptimizationConfig | None = None,
        max_variants: int = 3,
        lora: LoraSettings | None = None,
        memory_plan: MemoryPlan | None = None,
    ) -> "KontextEngine":
        env = current_environment(device)
        if env.has_cuda:
            torch.cuda.set_device(env.gpu.index)
        for warning in check_usable(model, env):  # refuses a prequantized format this machine cannot run
            log.warning("%s", warning)
        config = default_config or OptimizationConfig()
        settings = LoadSettings.from_config(_resolve_cached(config, env).effective)
        return cls(load_model(model, env.device, settings), env, config, max_variants, lora, memory_plan)

    def _apply_load_stages(self) -> None:
        """Load-scope stages (precision and placement of the base components) act once, on the default config."""
        resolved = self.resolve(self.default_config)
        build = BuildContext(self.env, self.loaded.device, self.loaded.dtype)
        apply(Phase.LOAD, self.loaded.pipe, resolved.effective, build)
        self.loaded.notes.extend(build.notes)
        self._loaded_knobs = {name: getattr(resolved.effective, name) for name in LOAD_FIELDS}
        if self.env.has_cuda:
            torch.cuda.empty_cache()  # what the load stages quantized away or moved to host memory

    def _graphed_text_encoders(self) -> TextEncoderGraphs | None:
        """CUDA graphs for T5 and CLIP (engine/text_encoder_graphs.py) where the encoders stay on the
        GPU: offloaded, their weights move in and out during each call, which a graph cannot hold."""
        if not self.env.has_cuda or self._loaded_knobs.get("text_encoders", "resident") != "resident":
            return None
        return TextEncoderGraphs(self.loaded.pipe)

    # -- introspection ----------------------------------------------------------------------------
    @property
    def model_info(self) -> dict:
        info = {**self.loaded.spec.as_dict(), "dtype": str(self.loaded.dtype).replace("torch.", ""), "device": str(self.loaded.device)}
        info["load_notes"] = list(self.loaded.notes)
        return info

    def resolve(self, config: OptimizationConfig | None = None) -> ResolvedConfig:
        """What `config` runs here: each stage against this machine and the rules, with the load-scope
        knobs as the model was loaded (the one place they are checked: a request that asks for other
        values gets the reason in its stage reports and warnings)."""
        requested = config or self.default_config
        resolved = _resolve_cached(requested.with_changes(**self._loaded_knobs), self.env)
        differing = [name for name, loaded in self._loaded_knobs.items() if getattr(requested, name) != loaded]
        if not differing:
            return resolved
        reports, notes = {report.name: report for report in resolved.reports}, []
        for name in differing:
            asked, loaded = getattr(requested, name), self._loaded_knobs[name]
            stage = KNOBS[name].stage
            report = reports[stage]
            reason = f"{name}={asked!r} not applied: {LOAD_TIME} (it runs with {loaded!r})"
            asked_for_stage = report.requested or get_stage(stage).is_requested(requested)
            reports[stage] = dataclasses.replace(report, requested=asked_for_stage, reason=reason)
            if report.active:  # a stage that still runs, differently: say so (skipped stages are reported as such)
                notes.append(reason)
        ordered = tuple(reports[report.name] for report in resolved.reports)
        return dataclasses.replace(resolved, requested=requested, reports=ordered, notes=tuple(notes))

    def stage_status(self, config: OptimizationConfig | None = None) -> list[dict]:
        """Every stage: available on this machine (and why not), and active in `config` (default: the server's)."""
        resolved = self.resolve(config)
        return [
            {**row, "active": resolved.report(row["name"]).active, "active_detail": resolved.report(row["name"]).detail}
            for row in stage_status(self.env)
        ]

    def memory_report(self) -> dict:
        """The memory tier (when one was chosen) and the memory knobs the model runs with."""
        plan = self.memory_plan.as_dict() if self.memory_plan else {"tier": None, "source": "no plan: the knobs as configured"}
        return {**plan, "loaded_knobs": dict(self._loaded_knobs)}

    def memory(self) -> dict:
        if not self.env.has_cuda:
            return {"device": "cpu"}
        index = self.env.gpu.index
        free, total = torch.cuda.mem_get_info(index)
        return {
            "allocated_gb": round(torch.cuda.memory_allocated(index) / 2**30, 2),
            "reserved_gb": round(torch.cuda.memory_reserved(index) / 2**30, 2),
            "free_gb": round(free / 2**30, 2),
            "total_gb": round(total / 2**30, 2),
        }

    # -- the edit ---------------------------------------------------------------------------------
    def edit(
        self,
        request: EditRequest,
        config: OptimizationConfig | None = None,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
        wait_for_build: bool = True,
        warm_up: bool = False,
    ) -> EditResult:
        """Run one edit. `should_stop` is polled after every denoising step; when it returns True the
        edit raises EditCancelled there, so an abandoned request stops using the GPU. An edit that
        would record CUDA graphs waits for a build beside it, or with `wait_for_build` False (idle
        work) raises BuildInProgress at once. A `warm_up` edit records its shape's CUDA graphs even
        where requests defer that (`defer_graph_recording`)."""
        with self._lock:  # one edit at a time; a variant build may run beside it (build_variant)
            return self._edit(request, config, progress, should_stop, wait_for_build=wait_for_build, warm_up=warm_up)

    # -- building beside the edits ----------------------------------------------------------------
    @property
    def builds_beside_edits(self) -> bool:
        """Whether a variant may be built and warmed on another thread while edits run: not when
        weights move between host and GPU during an edit (group offload, offloaded text encoders:
        their hooks are not made for two threads)."""
        knobs = self._loaded_knobs
        return not knobs.get("transformer_offload") and knobs.get("text_encoders", "resident") != "offloaded"

    @property
    def building(self) -> bool:
        """Whether a variant is being built beside the serving thread now."""
        return self._build_lock.locked()

    def records_cuda_graphs(self, prepared: PreparedEdit) -> bool:
        """Whether this edit on the serving thread will record CUDA graphs: its variant captures them
        and has not run this shape on that thread yet. Such an edit waits for a build beside it. A
        build's GPU work synchronizes the device (Inductor's autotuning of a kernel's first call,
        its warm-up runs), which invalidates any capture in progress: on an H100 (2026-12-06) that
        broke the serving thread's recording of a shape, and two requests failed with it."""
        if self.loaded.device.type != "cuda" or not prepared.resolved.effective.cuda_graphs:
            return False
        return self.shape_of(prepared.request, prepared.width, prepared.height) not in prepared.variant.shapes_run

    def _graph_use(self, prepared: PreparedEdit, records: bool, deferred: bool) -> str | None:
        """What an edit on the serving thread does with its shape's CUDA graphs, for its answer:
        "recorded" (from its second transformer call), "replayed", "deferred" (ran without them:
        `_defers_recording`), or None where its variant captures none."""
        if deferred:
            return "deferred"
        if records:
            return "recorded"
        captures = self.loaded.device.type == "cuda" and prepared.resolved.effective.cuda_graphs
        return "replayed" if captures else None

    def _defers_recording(self, prepared: PreparedEdit) -> bool:
        """Whether an edit that would record CUDA graphs runs without them instead. The step that
        records costs 0.35-0.45 s more than a replayed one whatever the shape (H100, 2026-12-06: one
        step at 3-5.5x the median in the first request at a shape), while the compiled blocks without
        graphs run the same kernels at about the replayed speed at these sizes. So, with
        `defer_graph_recording`, a shape's first request runs them without graphs, and the next
        edit at that shape records: the idle warm-up's (engine/warmup.py, which sees the shape as
        not run) or its second request's, whichever comes first. A server that is never idle thus
        records each shape once, in its second request, as it would have in its first."""
        if not self.defer_graph_recording:
            return False
        return self.shape_of(prepared.request, prepared.width, prepared.height) not in prepared.variant.shapes_deferred

    def variant_for(self, request: EditRequest, config: OptimizationConfig | None = None) -> tuple[tuple, bool]:
        """(the variant an edit of `request` with `config` runs on, whether it is ready: built, and
        compiled if compile is on). Reads only: nothing is loaded or built."""
        named = tuple(choice for choice in request.loras if choice.scale != 0)
        effective = self.resolve(self.with_lora(config or self.default_config, named)).effective
        return self.variants.execution_key(effective), self.variants.is_ready(effective)

    def build_variant(self, request: EditRequest, config: OptimizationConfig | None = None) -> float:
        """Build the variant `request` runs on and run a one-step edit of its shape on it, where a
        compiled variant compiles; the seconds it took. Beside `edit`, on another thread: builds take
        turns among themselves, never with edits."""
        started = time.perf_counter()
        merging = self.loras.settings.merges  # merged weights are the serving thread's: the warm-up runs without adapters
        warm = dataclasses.replace(request, steps=BUILD_STEPS, seed=0, loras=() if merging else request.loras)
        with self._build_lock, serving_thread_first():
            self._edit(warm, config, background=True)
        return time.perf_counter() - started

    def _edit(
        self,
        request: EditRequest,
        config: OptimizationConfig | None,
        progress: bool = False,
        should_stop=None,
        background: bool = False,
        wait_for_build: bool = True,
        warm_up: bool = False,
    ) -> EditResult:
        prepared = self.prepare(request, config, background)
        shape = self.shape_of(prepared.request, prepared.width, prepared.height)
        records = not background and self.records_cuda_graphs(prepared)
        deferred = records and not warm_up and self._defers_recording(prepared)
        if deferred:
            from patches.cudagraph_trees_bypass import without_cuda_graphs

            records = False  # no capture, so nothing for a build beside it to break: no build lock
            prepared.stage_state.contexts.append(without_cuda_graphs())
        graphs = None if background else self._graph_use(prepared, records, deferred)
        if graphs is not None and self.text_encoder_graphs is not None:  # the encoders follow the blocks' graphs
            report = prepared.stage_state.extras.setdefault("text_encoder_graphs", {})
            prepared.stage_state.contexts.append(use_graphs(may_record=records, report=report))
        locked = False
        try:
            if records:
                if not self._build_lock.acquire(blocking=wait_for_build):
                    raise BuildInProgress("a variant is being built beside the serving thread; this edit would record CUDA graphs")
                locked = True
            timer = EditTimer(self.clock)
            first_use = prepared.variant.first_call_s is None
            prepared.pipe.set_progress_bar_config(disable=not progress, leave=False)
            with torch.no_grad():
                try:
                    latents = self.denoise(prepared, timer, should_stop)
                except MergeRefused as refused:  # merge mode: a Linear this variant lacks, or a format the merge cannot write
                    raise LoraError(f"LoRA adapters cannot be merged here: {refused}", field="loras") from None
                images = self.decode(prepared, latents, timer)
            timings = timer.finish(variant_build_s=prepared.build_s, lora_load_s=prepared.lora_load_s)
            if first_use:
                prepared.variant.first_call_s = timings.total_s
            if deferred:
                prepared.variant.shapes_deferred.add(shape)
            elif not background and _full_transformer_calls(prepared) >= WARMUP_STEPS:  # cudagraph trees are per thread
                prepared.variant.shapes_run.add(shape)
        finally:
            if locked:
                self._build_lock.release()
            self.variants.release(prepared.variant)
        if prepared.stage_state.extras.get("lora", {}).get("swap_s"):
            self.loras.record_swap(prepared.stage_state.extras["lora"]["swap_s"])
        return EditResult(
            images=images,
            seed=prepared.seed,
            width=prepared.width,
            height=prepared.height,
            steps=prepared.steps,
            scheduler=prepared.resolved.effective.scheduler,
            timings=timings,
            stages=prepared.resolved.reports,
            config=prepared.resolved.effective,
            model=self.model_info,
            variant={
                "first_use": first_use,
                "build_s": round(prepared.build_s, 3),
                "added_memory_mb": round(prepared.variant.added_bytes / 2**20, 1),
                "cuda_graphs": graphs,
            },
            extras=prepared.stage_state.extras,
            warnings=list(prepared.resolved.notes),
        )

    def prepare(self, request: EditRequest, config: OptimizationConfig | None = None, background: bool = False) -> PreparedEdit:
        """Resolve the config, fetch or build its variant (pinned until the edit releases it), run the
        stages' REQUEST phase, and decide size, seed, steps and sampler: everything but the GPU work."""
        loads: list[tuple[str, float]] = []
        loras = self.loras.pick(request.loras, loads)  # loads a named adapter on its first use
        resolved = self.resolve(self.with_lora(config or self.default_config, loras))
        if loras and not resolved.report("lora").active:  # never run a request without the adapters it named
            raise LoraError(f"LoRA adapters cannot run here: {resolved.report('lora').reason}", field="loras")
        effective = resolved.effective
        pipe, variant, build_s = self.variants.pipeline_for(effective, pin=True)  # WEIGHTS, EXECUTION and VAE phases, cached
        try:
            input_size = request.image.size if request.image else None
            width, height = output_size(request.width, request.height, input_size, request.max_area or self.loaded.spec.default_max_area)
            latent_cell = pipe.vae_scale_factor * 2  # VAE downsampling, then 2x2 latent patches per token
            base_scheduler = self.loaded.pipe.scheduler
            run = RequestContext(
                pipe.transformer,
                true_cfg=request.true_cfg_scale > 1 and request.negative_prompt is not None,
                output_tokens=(height // latent_cell) * (width // latent_cell),
                loras=loras,
                scheduler=type(base_scheduler).from_config(base_scheduler.config),  # samplers keep state: a fresh one per request
                variant_key=variant.key,
                merged=self.variants.merged,
                background=background,
            )
            apply(Phase.REQUEST, run, effective)  # the sampler, the adapters, the cache state
            image = self._conditioning_image(request.image, width, height)
        except BaseException:
            self.variants.release(variant)  # the edit that pinned it will not run
            raise
        pipe.scheduler = run.scheduler
        if loads:
            run.extras.setdefault("lora", {})["loaded"] = [{"name": name, "load_s": round(seconds, 4)} for name, seconds in loads]
        return PreparedEdit(
            request=request,
            resolved=resolved,
            pipe=pipe,
            variant=variant,
            build_s=build_s,
            stage_state=run,
            steps=request.steps or run.default_steps,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            width=width,
            height=height,
            image=image,
            lora_load_s=sum(seconds for _, seconds in loads),
        )

    def shape_of(self, request: EditRequest, width: int | None = None, height: int | None = None) -> tuple:
        """The shape an edit of `request` runs at (engine/sizes.py: edit_shape); `width` and `height`
        when already decided."""
        input_size = request.image.size if request.image else None
        if width is None or height is None:
            width, height = output_size(request.width, request.height, input_size, request.max_area or self.loaded.spec.default_max_area)
        return edit_shape(width, height, input_size, request.num_images, self.loaded.spec.snap_input_to_kontext_resolutions)

    def with_lora(self, config: OptimizationConfig, loras) -> OptimizationConfig:
        """The LoRA knobs are the engine's, from the server's settings: the lora stage runs exactly for
        requests with adapters, and in merge mode also for a request that must restore the base weights."""
        settings = self.loras.settings
        if settings.merges:
            return config.with_changes(lora="merge" if loras or self.variants.merged.merged_any else "off", lora_slots=0, lora_rank=0)
        if loras:
            return config.with_changes(lora="slots", lora_slots=settings.slots, lora_rank=settings.max_rank)
        return config.with_changes(lora="off", lora_slots=0, lora_rank=0)

    def denoise(self, prepared: PreparedEdit, timer: EditTimer, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Text and VAE encoding and the denoising loop: the packed latents of the output."""
        request, pipe, steps = prepared.request, prepared.pipe, prepared.steps

        def on_step_end(pipeline, index, timestep, tensors):
            timer.step_finished()
            if should_stop is not None and should_stop():
                raise EditCancelled(f"stopped after step {index + 1} of {steps}")
            return {}

        with instrumented(pipe, timer), contextlib.ExitStack() as stack:
            for context in prepared.stage_state.contexts:
                stack.enter_context(context)
            image, auto_resize = prepared.image, self.loaded.spec.snap_input_to_kontext_resolutions
            if image is not None:  # here, inside the edit's timer: it is part of the edit's time
                image = conditioning_pixels(pipe.image_processor, image, pipe.vae_scale_factor * 2, auto_resize, pipe._execution_device)
            return pipe(
                image=image,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                true_cfg_scale=request.true_cfg_scale,
                width=prepared.width,
                height=prepared.height,
                max_area=prepared.width * prepared.height,  # diffusers re-derives the size from max_area; this keeps ours
                num_inference_steps=steps,
                guidance_scale=request.guidance_scale,
                num_images_per_prompt=request.num_images,
                generator=torch.Generator("cpu").manual_seed(prepared.seed),  # same noise on any device
                output_type="latent",
                callback_on_step_end=on_step_end,
                _auto_resize=auto_resize,
            ).images

    def decode(self, prepared: PreparedEdit, latents: torch.Tensor, timer: EditTimer) -> list[Image.Image]:
        """What FluxKontextPipeline does after denoising, done here so that it can be timed on its own."""
        pipe = prepared.pipe
        with timer.span("vae_decode"):
            unpacked = pipe._unpack_latents(latents, prepared.height, prepared.width, pipe.vae_scale_factor)
            unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            pixels = pipe.vae.decode(unpacked, return_dict=False)[0]
        return pictures_from_pixels(pipe.image_processor, pixels)

    def _conditioning_image(self, image: Image.Image | None, width: int, height: int) -> Image.Image | None:
        if image is None:
            return None
        image = image.convert("RGB") if image.mode != "RGB" else image
        if self.loaded.spec.snap_input_to_kontext_resolutions:
            return image  # diffusers resizes it to the closest preferred (~1 MP) resolution
        # Models without Kontext's training resolutions (tiny) condition at the output size.
        return image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image


def _full_transformer_calls(prepared: PreparedEdit) -> int:
    """Transformer calls that ran every block (the first-block cache counts them; true CFG makes two per step)."""
    cache = prepared.stage_state.extras.get("first_block_cache") or {}
    return cache.get("computed", prepared.steps * (2 if prepared.stage_state.true_cfg else 1))


def _as_loaded(config: OptimizationConfig, loaded: LoadedModel, env: Environment) -> OptimizationConfig:
    """A prequantized checkpoint's FP8 weights are what runs, whatever the config asked for."""
    effective = _resolve_cached(config, env).effective
    changes = {}
    fmt = format_of(loaded.pipe.transformer)
    if fmt and effective.transformer_fp8 != fmt:
        changes["transformer_fp8"] = fmt
    if has_quantized_weights(loaded.pipe.text_encoder_2) and not effective.t5_fp8:
        changes["t5_fp8"] = True
    if changes:
        loaded.notes.append("the prequantized checkpoint decides: " + ", ".join(f"{name}={value}" for name, value in changes.items()))
    return config.with_changes(**changes)


@functools.lru_cache(maxsize=256)
def _resolve_cached(config: OptimizationConfig, env: Environment) -> ResolvedConfig:
    return resolve(config, env)
