"""Loading the engine a command serves or runs: the memory plan for this machine, the preset, the
flags, the LoRA settings; shared by `serve`, its worker processes, the Ray fleet and the torchrun ranks.

`EngineOptions` is what the command line says about the engine, in one picklable object: worker
processes (`serve --gpus`) and Ray replicas receive it, never the argparse Namespace.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from engine.lora_settings import LoraSettings
from engine.memory_plan import TIERS
from engine.model_specs import HUB_DEFAULT, MODEL_ENV_VAR
from engine.setting import setting
from stages.config import MAX_PRESET, OptimizationConfig, cumulative_config

log = logging.getLogger("flux_kontext")

PRESET_ENV_VAR = "FLUX_KONTEXT_PRESET"
DEVICE_ENV_VAR = "FLUX_KONTEXT_DEVICE"
MEMORY_BUDGET_ENV_VAR = "FLUX_KONTEXT_MEMORY_BUDGET"
ENGINE = "model and engine"
_TIERS = ", ".join(f"{tier.name} >= {tier.min_free_gib:g}" if tier.min_free_gib else f"{tier.name} below" for tier in TIERS)


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = setting(
        None,
        f"hub repo id, local directory, 'tiny' or 'synthetic-full' (env {MODEL_ENV_VAR}; default {HUB_DEFAULT} on a GPU, tiny otherwise)",
        ENGINE,
    )
    device: str | None = setting(
        None, f"cuda:N to pin one GPU, or cpu (env {DEVICE_ENV_VAR}; default cuda:0 if present)", ENGINE, env=DEVICE_ENV_VAR
    )
    memory_budget: float | None = setting(
        None,
        f"GiB of GPU memory the model may use; picks the memory tier ({_TIERS}). Default: the GPU's free memory at startup "
        f"(env {MEMORY_BUDGET_ENV_VAR})",
        ENGINE,
        env=MEMORY_BUDGET_ENV_VAR,
        metavar="GB",
    )
    max_variants: int = setting(3, "optimization variants kept built at once (least recently used is dropped)", ENGINE)
    compile_cache: str | None = setting(
        None,
        "directory for persistent compile artifacts (env FLUX_KONTEXT_COMPILE_CACHE; default ~/.cache/flux-kontext-optimized/inductor)",
        ENGINE,
    )
    preset: int | None = None  # --preset (generated with the optimization flags from the knobs)
    optimizations: dict = field(default_factory=dict)  # the optimization flags given, over the preset
    lora: LoraSettings = field(default_factory=LoraSettings)

    def config(self, has_cuda: bool, plan_changes: dict | None = None) -> OptimizationConfig:
        return optimization_config(self.preset, self.optimizations, has_cuda, plan_changes)

    def on(self, device: str) -> "EngineOptions":
        return dataclasses.replace(self, device=device)


def optimization_config(preset: int | None, given: dict, has_cuda: bool, plan_changes: dict | None = None) -> OptimizationConfig:
    """The preset, then the memory plan's knobs, then every optimization flag that was given; ValueError on a bad value."""
    if preset is None:
        preset = int(os.environ.get(PRESET_ENV_VAR, MAX_PRESET if has_cuda else 0))
    try:
        return cumulative_config(preset).with_changes(**{**(plan_changes or {}), **given})
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"invalid optimization flag: {error}") from None


def load_engine(options: EngineOptions, plan_changes: dict | None = None, engine_class=None):
    """The engine for `options`: the memory plan for this GPU (or --memory-budget), the preset, then the flags.
    `plan_changes` replaces the plan's knobs (quantize keeps the heavy components in host memory);
    `engine_class` is the context-parallel engine under torchrun."""
    from engine.compile_cache import configure_compile_cache
    from engine.engine import KontextEngine
    from engine.loading import default_model_name
    from engine.memory_plan import choose_memory_plan
    from stages.environment import current_environment

    configure_compile_cache(options.compile_cache)
    env = current_environment(options.device)
    plan = choose_memory_plan(env, options.memory_budget)
    config = options.config(env.has_cuda, plan.changes if plan_changes is None else plan_changes)
    model = options.model or default_model_name(env.device)
    if plan_changes is None:
        log.info("%s", plan.describe())
        for note in plan.notes:
            log.info("memory plan: %s", note)
    log.info("loading %s on %s", model, env.device)
    memory_plan = plan if plan_changes is None else None
    engine = (engine_class or KontextEngine).load(
        model, env.device, config, max_variants=options.max_variants, lora=options.lora, memory_plan=memory_plan
    )
    _log_stages(engine)
    log.info("LoRA directory: %s", engine.loras.directory)  # the server's log says where; clients only ever see names
    for adapter in engine.loras.loaded():
        log.info(
            "LoRA adapter %s loaded: rank %d, %d layers, %.1f MB",
            adapter.name,
            adapter.weights.rank,
            len(adapter.weights.modules),
            adapter.nbytes / 2**20,
        )
    return engine


def _log_stages(engine) -> None:
    """Say what will run and, for every requested stage this machine cannot run, why not."""
    resolved = engine.resolve()
    log.info("stages on: %s", ", ".join(resolved.active_stages) or "none (stage 0)")
    for name, reason in resolved.skipped.items():
        log.warning("stage %s requested but will not run: %s", name, reason)


def load_worker_engine(options: EngineOptions, device: str):
    """The engine of one `serve --gpus` worker process (a module-level function: it is pickled to the worker)."""
    return load_engine(options.on(device))
