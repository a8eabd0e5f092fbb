"""What each command does. Heavy imports (torch, diffusers) happen here, inside the commands, so that
the parser and --help stay fast."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

from .engine_loader import load_engine, load_worker_engine
from .options import engine_options_from_args, given_optimization_flags, optimization_config_from_args, service_settings_from_args

log = logging.getLogger("flux_kontext")


def cmd_doctor(args) -> int:
    from engine.memory_plan import choose_memory_plan
    from stages.environment import current_environment

    from .doctor import render_doctor

    env = current_environment(args.device)
    plan = choose_memory_plan(env, args.memory_budget)
    config = optimization_config_from_args(args, env.has_cuda, plan.changes)
    print(render_doctor(env, config, plan, engine_options_from_args(args).lora))
    return 0


def cmd_quantize(args) -> int:
    import time

    from engine.checkpoints import WRITING_KNOBS, save_prequantized
    from engine.loading import quantized_components

    if args.model and Path(args.model).is_dir() and quantized_components(Path(args.model)):
        raise ValueError(f"{args.model} is already a prequantized checkpoint: use it as it is, or quantize the bf16 model it came from")
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} exists and is not empty: give a new directory to --out")
    started = time.perf_counter()
    engine = load_engine(engine_options_from_args(args), plan_changes=WRITING_KNOBS)
    loaded_knobs = engine.memory_report()["loaded_knobs"]
    knobs = {name: loaded_knobs[name] for name in ("transformer_fp8", "t5_fp8")}
    manifest = save_prequantized(engine.loaded.pipe, args.out, source=engine.loaded.spec.name, knobs=knobs)
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    summary = {"out": str(args.out), "seconds": round(time.perf_counter() - started, 1), "gib_on_disk": round(size / 2**30, 2)}
    print(json.dumps({**summary, **manifest}, indent=2))
    return 0


def cmd_edit(args) -> int:
    from PIL import Image

    from engine.requests import EditRequest, LoraChoice
    from engine.sizes import parse_aspect_ratio, scale_to_area

    image = Image.open(args.image) if args.image else None  # fail on a bad path before loading a model
    loras = tuple(LoraChoice.parse(text) for text in args.lora or ())
    engine = load_engine(engine_options_from_args(args, preload=tuple(choice.name for choice in loras)))
    width, height = args.width, args.height
    if args.aspect_ratio:
        width, height = scale_to_area(*parse_aspect_ratio(args.aspect_ratio), engine.loaded.spec.default_max_area)
    request = EditRequest(
        prompt=args.prompt,
        image=image,
        negative_prompt=args.negative_prompt,
        width=width,
        height=height,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
        seed=args.seed,
        num_images=args.num_images,
        loras=loras,
    )
    result = engine.edit(request, progress=True)
    paths = _output_paths(args, result.seed, len(result.images))
    for path, picture in zip(paths, result.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    print(json.dumps({"outputs": [str(p) for p in paths], **result.metadata()}, indent=2))
    return 0


def _output_paths(args, seed: int, count: int) -> list[Path]:
    if args.out is None:
        return [args.output_dir / f"kontext-{seed}-{i}.png" for i in range(count)]
    if count == 1:
        return [args.out]
    return [args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix or '.png'}") for i in range(count)]


def cmd_benchmark(args) -> int:
    from engine.benchmark.report import write_results
    from engine.benchmark.runner import BenchmarkSettings, parse_row_kinds, run_benchmark, select_options
    from stages.config import parse_presets

    settings = BenchmarkSettings(
        stages=parse_presets(args.stages),
        rows=parse_row_kinds(args.rows),
        width=args.width,
        height=args.height,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        with_input_image=not args.text_to_image,
        profile=args.profile,
        options=select_options(args.option_rows),
        overrides=given_optimization_flags(args),  # on top of every preset: --no-compile keeps a CPU run short
    )
    engine = load_engine(engine_options_from_args(args))
    report = run_benchmark(engine, settings, show_progress=True)
    directory = write_results(report, args.results_dir)
    print(report.markdown())
    print(f"\nresults written to {directory}")
    return 0


def cmd_precompile(args) -> int:
    import time

    from engine.compile_artifacts import bundle_key, compile_counters, default_bundle_path, read_manifest, save_bundle
    from engine.compile_cache import active_cache_dir
    from engine.warmup import warm_up

    loading = time.perf_counter()
    engine = load_engine(engine_options_from_args(args))
    load_s = round(time.perf_counter() - loading, 2)
    if not engine.resolve().effective.compile:
        print("nothing to precompile: compile is off in this configuration (or cannot run on this machine); no bundle written")
        return 0
    started = time.perf_counter()
    report = warm_up(engine)
    warmup_s = round(time.perf_counter() - started, 1)
    key = bundle_key(engine.env, engine.resolve().effective)
    recording, recorded = None, time.perf_counter()
    if args.aot_compile:
        from engine.warmup import record_aot_functions

        recording = record_aot_functions(engine)
    path = save_bundle(
        args.out or default_bundle_path(active_cache_dir(), key), key, report.shapes, {"warmup": report.as_dict()}, recording
    )
    summary = {
        "bundle": str(path),
        "megabytes": round(path.stat().st_size / 2**20, 1),
        "load_s": load_s,
        "warmup_s": warmup_s,
    }
    if recording is not None:
        summary["aot"] = {**read_manifest(path).get("aot", {}), "record_s": round(time.perf_counter() - recorded, 1)}
    print(json.dumps({**summary, "warmup": report.as_dict(), "compile_counters": compile_counters()}, indent=2))
    return 0


def cmd_serve(args) -> int:
    from service.app import create_app
    from service.server import serve

    settings, options = service_settings_from_args(args), engine_options_from_args(args)
    if settings.api_key:
        log.info("API key required on every endpoint but /health and /ready (from $%s)", settings.api_key_env)
    elif not settings.listens_on_loopback:
        log.warning("listening on %s without an API key: set $%s to require one", settings.host, settings.api_key_env)
    if (args.context_parallel or 1) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        from .scale import serve_context_parallel

        return serve_context_parallel(args, settings, options)
    if args.gpus:
        from service.runtime import Service
        from service.worker_pool import WorkerPool

        from .scale import worker_gpus

        gpus = worker_gpus(args.gpus, options.device)
        log.info("one worker process per GPU: %s", ", ".join(gpu or "cpu" for gpu in gpus))
        loader = functools.partial(load_worker_engine, options)
        app = create_app(service=Service(settings, worker=lambda metrics: WorkerPool(gpus, loader, settings, settings.queue_size, metrics)))
    else:
        # The model loads on the GPU worker after the server is up: /health answers at once, /ready
        # turns 200 once the model is loaded and warm.
        app = create_app(settings=settings, loader=functools.partial(load_engine, options))
    status = serve(app, settings.host, settings.port, log_level="debug" if args.verbose else "info")
    if status:
        print(f"error: {app.state.service.error}", file=sys.stderr)
    return status


def cmd_fleet(args) -> int:
    from .fleet import cmd_fleet as run_fleet

    return run_fleet(args)


HANDLERS = {
    "fleet": cmd_fleet,
    "doctor": cmd_doctor,
    "edit": cmd_edit,
    "benchmark": cmd_benchmark,
    "precompile": cmd_precompile,
    "quantize": cmd_quantize,
    "serve": cmd_serve,
}
