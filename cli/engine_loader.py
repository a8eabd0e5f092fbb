"""Loading the engine a command serves or runs: the memory plan for this machine, the preset, the
flags, the LoRA settings; shared by `serve`, its worker processes, the Ray fleet and the torchrun ranks."""

from __future__ import annotations

import argparse
import logging

from .options import lora_settings_from_args, optimization_config_from_args

log = logging.getLogger("flux_kontext")


def load_engine(args: argparse.Namespace, plan_changes: dict | None = None, preload_loras: tuple[str, ...] = (), engine_class=None):
    """The engine for `args`: the memory plan for this GPU (or --memory-budget), the preset, then the flags.
    `plan_changes` replaces the plan's knobs (quantize keeps the heavy components in host memory);
    `engine_class` is the context-parallel engine under torchrun."""
    from engine.compile_cache import configure_compile_cache
    from engine.engine import KontextEngine
    from engine.loading import default_model_name
    from engine.memory_plan import choose_memory_plan
    from stages.environment import current_environment

    configure_compile_cache(args.compile_cache)
    env = current_environment(args.device)
    plan = choose_memory_plan(env, args.memory_budget)
    config = optimization_config_from_args(args, env.has_cuda, plan.changes if plan_changes is None else plan_changes)
    model = args.model or default_model_name(env.device)
    if plan_changes is None:
        log.info("%s", plan.describe())
        for note in plan.notes:
            log.info("memory plan: %s", note)
    log.info("loading %s on %s", model, env.device)
    lora = lora_settings_from_args(args, preload_loras)
    memory_plan = plan if plan_changes is None else None
    engine = (engine_class or KontextEngine).load(
        model, env.device, config, max_variants=args.max_variants, lora=lora, memory_plan=memory_plan
    )
    _log_stages(engine)
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


def load_worker_engine(args: argparse.Namespace, device: str):
    """The engine of one `serve --gpus` worker process (a module-level function: it is pickled to the worker)."""
    return load_engine(argparse.Namespace(**{**vars(args), "device": device}), preload_loras=tuple(args.preload_lora or ()))
