"""The Kontext editing engine: one call runs an edit with an optimization config.

    engine = KontextEngine.load("tiny", device="cpu")
    result = engine.edit(EditRequest(prompt="make the sky red", image=img), OptimizationConfig(compile=True))

The requested config is first resolved against this machine (unavailable stages are switched off
and reported), then the matching built variant is fetched or built (engine.variants), per-request
stage settings are applied (scheduler, cache threshold), and the pipeline runs with timing marks
around text encoding, VAE encoding, every denoising step and VAE decoding.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from PIL import Image

import stages
from stages import ResolvedConfig

from .config import OptimizationConfig
from .environment import Environment, current_environment
from .loading import LoadedModel, load_model
from .requests import EditRequest, EditResult
from .sizes import output_size
from .timing import Clock, EditTimer
from .variants import VariantCache

log = logging.getLogger(__name__)

EULER_DEFAULT_STEPS = 28


class EditCancelled(Exception):
    """`should_stop` asked the edit to stop; raised at the next step boundary."""


@dataclass
class RequestRun:
    """Per-request state that stages may set in `apply_request`."""

    request: EditRequest
    scheduler: object
    transformer: torch.nn.Module  # the variant's transformer that will run
    default_steps: int = EULER_DEFAULT_STEPS
    contexts: list = field(default_factory=list)  # entered around the pipeline call
    extras: dict = field(default_factory=dict)  # reported in the result


class KontextEngine:
    def __init__(self, loaded: LoadedModel, env: Environment, default_config: OptimizationConfig | None = None, max_variants: int = 3):
        self.loaded = loaded
        self.env = env
        self.default_config = default_config or OptimizationConfig()
        self.variants = VariantCache(loaded.pipe, loaded.device, loaded.dtype, env, max_variants=max_variants)
        self.clock = Clock(loaded.device)
        self._lock = threading.Lock()  # one edit at a time: variants and the GPU are shared state

    @classmethod
    def load(
        cls,
        model: str,
        device: str | None = None,
        default_config: OptimizationConfig | None = None,
        max_variants: int = 3,
        t5_fp8: bool = False,
    ) -> "KontextEngine":
        env = current_environment(device)
        if env.has_cuda:
            torch.cuda.set_device(env.gpu.index)
        loaded = load_model(model, env.device)
        if t5_fp8:
            _quantize_t5(loaded, env)
        return cls(loaded, env, default_config, max_variants)

    # -- introspection ----------------------------------------------------------------------------
    @property
    def model_info(self) -> dict:
        info = {**self.loaded.spec.as_dict(), "dtype": str(self.loaded.dtype).replace("torch.", ""), "device": str(self.loaded.device)}
        info["text_encoder_2"] = self.loaded.text_encoder_note
        return info

    def resolve(self, config: OptimizationConfig | None = None) -> ResolvedConfig:
        return _resolve_cached(config or self.default_config, self.env)

    def stage_status(self, config: OptimizationConfig | None = None) -> list[dict]:
        """Every stage: available on this machine (and why not), and active in `config` (default: the server's)."""
        resolved = self.resolve(config)
        active = {report.name: report for report in resolved.reports}
        return [{**row, "active": active[row["name"]].active, "active_detail": active[row["name"]].detail} for row in stages.stage_status(self.env)]

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
    ) -> EditResult:
        """Run one edit. `should_stop` is polled after every denoising step; when it returns True the
        edit raises EditCancelled there, so an abandoned request stops using the GPU."""
        resolved = self.resolve(config)
        effective = resolved.effective
        with self._lock:
            pipe, variant, build_s = self.variants.pipeline_for(effective)
            run = RequestRun(request, FlowMatchEulerDiscreteScheduler.from_config(self.loaded.pipe.scheduler.config), pipe.transformer)
            for stage in stages.STAGES:
                if stage.is_requested(effective):
                    stage.apply_request(run, effective)
            pipe.scheduler = run.scheduler
            pipe.set_progress_bar_config(disable=not progress, leave=False)
            steps = request.steps or effective.steps or run.default_steps
            seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
            width, height = output_size(request.width, request.height, request.image.size if request.image else None, request.max_area or self.loaded.spec.default_max_area)
            image = self._prepare_input(request.image, width, height)

            timer = EditTimer(self.clock)
            first_use = variant.first_call_s is None

            def on_step_end(pipeline, index, timestep, tensors):
                timer.step_finished()
                if should_stop is not None and should_stop():
                    raise EditCancelled(f"stopped after step {index + 1} of {steps}")
                return {}

            with torch.no_grad(), _instrumented(pipe, timer), contextlib.ExitStack() as stack:
                for context in run.contexts:
                    stack.enter_context(context)
                packed = pipe(
                    image=image,
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    true_cfg_scale=request.true_cfg_scale,
                    width=width,
                    height=height,
                    max_area=width * height,  # diffusers re-derives the size from max_area; this keeps ours
                    num_inference_steps=steps,
                    guidance_scale=request.guidance_scale,
                    num_images_per_prompt=request.num_images,
                    generator=torch.Generator("cpu").manual_seed(seed),  # same noise on any device
                    output_type="latent",
                    callback_on_step_end=on_step_end,
                    _auto_resize=self.loaded.spec.snap_input_to_kontext_resolutions,
                ).images
                with timer.span("vae_decode"):
                    pixels = _decode(pipe, packed, width, height)
                images = pipe.image_processor.postprocess(pixels, output_type="pil")
            timings = timer.finish(variant_build_s=build_s)
            if first_use:
                variant.first_call_s = timings.total_s

        return EditResult(
            images=images,
            seed=seed,
            width=width,
            height=height,
            steps=steps,
            scheduler=effective.scheduler,
            timings=timings,
            stages=resolved.reports,
            config=effective,
            model=self.model_info,
            variant={"first_use": first_use, "build_s": round(build_s, 3), "added_memory_mb": round(variant.added_bytes / 2**20, 1)},
            extras=run.extras,
        )

    def warm_up(self, config: OptimizationConfig | None = None, resolutions: list[tuple[int, int]] | None = None, steps: int = 2) -> list[dict]:
        """Build and compile the variant for `config` before traffic arrives.

        Full-size models warm up at two Kontext resolutions: the first compiles graphs for its exact
        shapes; the second makes Dynamo recompile them with dynamic sequence lengths (its automatic
        dynamic shapes), so that other Kontext resolutions run without a new compile. Measured on an
        H200 with the full stack, cold: 228 s, then 569 s; a third resolution then took 3.37 s for
        the whole edit (benchmarks/results/nvidia-h200-2026-11-22/startup.md)."""
        side = int(self.loaded.spec.default_max_area**0.5)
        if resolutions is None:
            resolutions = [(side, side)]
            if self.loaded.spec.default_max_area >= 1024 * 1024:
                resolutions.append((1184, 880))  # a second preferred Kontext resolution
        rows = []
        for width, height in resolutions:
            image = Image.new("RGB", (width, height), (120, 140, 160))
            result = self.edit(EditRequest(prompt="warm-up", image=image, width=width, height=height, steps=steps, seed=0), config)
            rows.append({"width": width, "height": height, "seconds": round(result.timings.total_s, 2)})
            log.info("warm-up %dx%d: %.1f s", width, height, result.timings.total_s)
        return rows

    def _prepare_input(self, image: Image.Image | None, width: int, height: int) -> Image.Image | None:
        if image is None:
            return None
        image = image.convert("RGB") if image.mode != "RGB" else image
        if self.loaded.spec.snap_input_to_kontext_resolutions:
            return image  # diffusers resizes it to the closest preferred (~1 MP) resolution
        # Models without Kontext's training resolutions (tiny) condition at the output size.
        return image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image


def _quantize_t5(loaded: LoadedModel, env: Environment) -> None:
    from stages.low_precision import quantize_text_encoder_fp8

    if not (env.has_cuda and env.has_package("torchao")):
        raise ValueError("--t5-fp8 needs a CUDA GPU and torchao")
    saved = quantize_text_encoder_fp8(loaded.pipe.text_encoder_2)
    loaded.text_encoder_note = f"T5 FP8 weight-only (saved {saved / 2**30:.1f} GB)"
    log.info(loaded.text_encoder_note)


@functools.lru_cache(maxsize=256)
def _resolve_cached(config: OptimizationConfig, env: Environment) -> ResolvedConfig:
    return stages.resolve(config, env)


@contextlib.contextmanager
def _instrumented(pipe: FluxKontextPipeline, timer: EditTimer):
    """Timing marks around the pipeline's own text and VAE encoders and each transformer step."""
    encode_prompt, encode_vae_image = pipe.encode_prompt, pipe._encode_vae_image

    def timed_encode_prompt(*args, **kwargs):
        with timer.span("text_encode"):
            return encode_prompt(*args, **kwargs)

    def timed_encode_vae_image(*args, **kwargs):
        with timer.span("vae_encode"):
            return encode_vae_image(*args, **kwargs)

    pipe.encode_prompt, pipe._encode_vae_image = timed_encode_prompt, timed_encode_vae_image
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: timer.transformer_called())
    try:
        yield
    finally:
        hook.remove()


def _decode(pipe: FluxKontextPipeline, packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """What FluxKontextPipeline does after denoising, done here so that it can be timed on its own."""
    latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return pipe.vae.decode(latents, return_dict=False)[0]
