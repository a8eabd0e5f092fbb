#!/usr/bin/env python3
"""FLUX.1-Kontext image editing, fast: the command line.

    python flux_kontext_optimized.py serve       # HTTP service on 127.0.0.1:8000
    python flux_kontext_optimized.py edit --image in.png --prompt "make the sky red" --out out.png
    python flux_kontext_optimized.py benchmark   # stage-by-stage speed table under benchmarks/results/
    python flux_kontext_optimized.py doctor      # torch/CUDA/GPU, packages, every stage's availability

--model picks the weights: a Hugging Face repo id or directory (default on a GPU:
black-forest-labs/FLUX.1-Kontext-dev), `tiny` (random weights, the default without a GPU) or
`synthetic-full` (the real architecture with random weights, for speed measurements).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEVICE_ENV_VAR = "FLUX_KONTEXT_DEVICE"


def _common_parser() -> argparse.ArgumentParser:
    from engine.cli_options import add_optimization_options
    from engine.loading import MODEL_ENV_VAR

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=None,
        help=f"hub repo id, local directory, 'tiny' or 'synthetic-full' (env {MODEL_ENV_VAR}; "
        "default: black-forest-labs/FLUX.1-Kontext-dev on a GPU, tiny otherwise)",
    )
    common.add_argument("--device", default=os.environ.get(DEVICE_ENV_VAR), help=f"cuda:N to pin one GPU, or cpu (env {DEVICE_ENV_VAR}; default cuda:0 if present)")
    common.add_argument("--max-variants", type=int, default=3, help="optimization variants kept built at once (least recently used is dropped)")
    common.add_argument("--t5-fp8", action="store_true", help="FP8 weight-only T5 encoder (GPU, torchao): about half its memory")
    common.add_argument("--compile-cache", default=None, help="directory for persistent compile artifacts (env FLUX_KONTEXT_COMPILE_CACHE; default ~/.cache/flux-kontext-optimized/inductor)")
    common.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    add_optimization_options(common)
    return common


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="flux_kontext_optimized.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = _common_parser()

    serve = commands.add_parser("serve", parents=[common], formatter_class=formatter, help="run the HTTP service")
    serve.add_argument("--host", default=os.environ.get("FLUX_KONTEXT_HOST", "127.0.0.1"), help="bind address (0.0.0.0 exposes the service to the network)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("FLUX_KONTEXT_PORT", "8000")), help="TCP port")
    _add_service_options(serve)

    edit = commands.add_parser("edit", parents=[common], formatter_class=formatter, help="edit one image (or generate one from text)")
    edit.add_argument("--image", type=Path, default=None, help="input image; omit to generate from the prompt alone")
    edit.add_argument("--prompt", required=True, help="the instruction, e.g. 'make the sky red'")
    edit.add_argument("--negative-prompt", default=None, help="negative prompt (used with --true-cfg-scale > 1)")
    edit.add_argument("--out", type=Path, default=None, help="output file (with several images: NAME_0.png, NAME_1.png, ...)")
    edit.add_argument("--output-dir", type=Path, default=Path("."), help="folder for outputs when --out is not given")
    edit.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    edit.add_argument("--steps", type=int, default=None, help="denoising steps (default: 28 Euler, 14 DPM-Solver++)")
    edit.add_argument("--num-images", type=int, default=1, help="images per prompt")
    edit.add_argument("--aspect-ratio", default=None, help="a Kontext preferred resolution (1392x752) or a ratio (16:9); default: follow the input image")
    edit.add_argument("--width", type=int, default=None, help="output width (multiple of 16)")
    edit.add_argument("--height", type=int, default=None, help="output height (multiple of 16)")
    edit.add_argument("--guidance-scale", type=float, default=2.5, help="distilled guidance")
    edit.add_argument("--true-cfg-scale", type=float, default=1.0, help="true CFG scale (> 1 with --negative-prompt; twice the cost)")

    bench = commands.add_parser("benchmark", parents=[common], formatter_class=formatter, help="stage-by-stage speed table")
    bench.add_argument("--stages", default="0-5", help="cumulative stages to run, e.g. 0-5 or 0,1,4")
    bench.add_argument("--width", type=int, default=None, help="output width (default: 1024, 256 for tiny)")
    bench.add_argument("--height", type=int, default=None, help="output height (default: 1024, 256 for tiny)")
    bench.add_argument("--repeats", type=int, default=3, help="timed edits per stage after warm-up")
    bench.add_argument("--warmup", type=int, default=1, help="untimed edits per stage (compilation happens here)")
    bench.add_argument("--text-to-image", action="store_true", help="benchmark generation without an input image")
    bench.add_argument("--results-dir", type=Path, default=None, help="where to write CSV/JSON/markdown/PNG (default benchmarks/results/<gpu>-<date>)")

    commands.add_parser("doctor", parents=[common], formatter_class=formatter, help="print the environment and every stage's availability")
    return parser


def _add_service_options(serve: argparse.ArgumentParser) -> None:
    from service.settings import API_KEY_ENV_DEFAULT, ServiceSettings

    d = ServiceSettings()
    boolean = argparse.BooleanOptionalAction
    load = serve.add_argument_group("load and timeouts")
    load.add_argument("--queue-size", type=int, default=d.queue_size, help="requests waiting for the GPU beyond the running one; more get 429 + Retry-After")
    load.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds from arrival to answer, queued time included; beyond: 504")
    load.add_argument("--drain-timeout", type=float, default=None, help="on SIGTERM, longest wait for queued and running work; None: request timeout + 30 s")
    load.add_argument("--warmup", action=boolean, default=d.warmup, help="one edit with the default config before /ready turns 200 (builds, compiles)")
    load.add_argument(
        "--per-request-variants",
        action=boolean,
        default=d.per_request_variants,
        help="let requests ask for build-time stages (compile, quantization, attention kernel, ...) other than the server's; "
        "each new combination builds a variant, and compile takes minutes per new shape",
    )
    limits = serve.add_argument_group("input limits")
    limits.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="request body cap (413 beyond)")
    limits.add_argument("--max-input-pixels", type=int, default=d.max_input_pixels, help="decoded input image cap (width x height)")
    limits.add_argument("--max-pixels", type=int, default=d.max_output_pixels, help="output pixels per request (width x height x images)")
    limits.add_argument("--min-size", type=int, default=None, help="smallest output side; None: 256 for real models, 16 for tiny")
    limits.add_argument("--max-size", type=int, default=d.max_size, help="largest output side")
    limits.add_argument("--max-steps", type=int, default=d.max_steps, help="most denoising steps a request may ask for")
    limits.add_argument("--default-steps", type=int, default=None, help="steps when a request gives none; None: the scheduler's (28 Euler, 14 DPM-Solver++)")
    limits.add_argument("--max-images", type=int, default=d.max_images, help="most images per request")
    security = serve.add_argument_group("security")
    security.add_argument(
        "--api-key-env",
        default=API_KEY_ENV_DEFAULT,
        help="environment variable holding the API key; when it is set, every endpoint but /health and /ready needs Authorization: Bearer <key>",
    )
    security.add_argument("--cors-origins", default="", help="comma-separated origins allowed by CORS; empty: CORS off")
    bench = serve.add_argument_group("GET /benchmark")
    bench.add_argument("--benchmark-stages", default="0-5", help="stages a benchmark runs by default, and the only ones ?stages= may pick")
    bench.add_argument("--benchmark-repeats", type=int, default=None, help="timed edits per stage; None: 3 on a GPU, 1 on a CPU")
    bench.add_argument("--benchmark-warmup", type=int, default=d.benchmark_warmup, help="untimed edits per stage")
    bench.add_argument("--benchmark-size", type=int, default=None, help="square output side; None: the model's default size")
    bench.add_argument("--benchmark-results-dir", type=Path, default=None, help="also write each finished table there (CSV/JSON/markdown/PNG)")


def _service_settings(args):
    from benchmarks.stage_benchmark import parse_stage_list
    from service.settings import ServiceSettings

    return ServiceSettings(
        queue_size=args.queue_size,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_input_pixels=args.max_input_pixels,
        max_output_pixels=args.max_pixels,
        min_size=args.min_size,
        max_size=args.max_size,
        max_steps=args.max_steps,
        default_steps=args.default_steps,
        max_images=args.max_images,
        per_request_variants=args.per_request_variants,
        warmup=args.warmup,
        api_key=ServiceSettings.api_key_from_env(args.api_key_env),
        cors_origins=tuple(origin.strip() for origin in args.cors_origins.split(",") if origin.strip()),
        benchmark_stages=tuple(parse_stage_list(args.benchmark_stages)),
        benchmark_warmup=args.benchmark_warmup,
        benchmark_repeats=args.benchmark_repeats,
        benchmark_size=args.benchmark_size,
        benchmark_results_dir=str(args.benchmark_results_dir) if args.benchmark_results_dir else None,
    )


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_engine(args):
    from engine import KontextEngine
    from engine.cli_options import optimization_config_from_args
    from engine.compile_cache import configure_compile_cache
    from engine.environment import current_environment
    from engine.loading import default_model_name

    configure_compile_cache(args.compile_cache)
    env = current_environment(args.device)
    config = optimization_config_from_args(args, env.has_cuda)
    model = args.model or default_model_name(env.device)
    logging.getLogger("flux_kontext").info("loading %s on %s; default optimizations: %s", model, env.device, config.describe())
    return KontextEngine.load(model, env.device, config, max_variants=args.max_variants, t5_fp8=args.t5_fp8)


def cmd_doctor(args) -> int:
    from engine.cli_options import optimization_config_from_args
    from engine.doctor import render_doctor
    from engine.environment import current_environment

    env = current_environment(args.device)
    print(render_doctor(env, optimization_config_from_args(args, env.has_cuda)))
    return 0


def cmd_edit(args) -> int:
    from PIL import Image

    from engine import EditRequest
    from engine.sizes import parse_aspect_ratio, scale_to_area

    image = Image.open(args.image) if args.image else None  # fail on a bad path before loading a model
    engine = _load_engine(args)
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
    )
    result = engine.edit(request, progress=True)
    paths = _output_paths(args, result.seed, len(result.images))
    for path, picture in zip(paths, result.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    summary = {"outputs": [str(p) for p in paths], **result.metadata()}
    print(json.dumps(summary, indent=2))
    return 0


def _output_paths(args, seed: int, count: int) -> list[Path]:
    if args.out is None:
        return [args.output_dir / f"kontext-{seed}-{i}.png" for i in range(count)]
    if count == 1:
        return [args.out]
    return [args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix or '.png'}") for i in range(count)]


def cmd_benchmark(args) -> int:
    from benchmarks.stage_benchmark import BenchmarkSettings, parse_stage_list, run_benchmark, write_results

    engine = _load_engine(args)
    settings = BenchmarkSettings(
        stages=parse_stage_list(args.stages),
        width=args.width,
        height=args.height,
        repeats=args.repeats,
        warmup=args.warmup,
        with_input_image=not args.text_to_image,
    )
    report = run_benchmark(engine, settings, show_progress=True)
    directory = write_results(report, args.results_dir)
    print(report.markdown())
    print(f"\nresults written to {directory}")
    return 0


def cmd_serve(args) -> int:
    from service.app import create_app
    from service.server import serve

    settings = _service_settings(args)
    log = logging.getLogger("flux_kontext")
    if settings.api_key:
        log.info("API key required on every endpoint but /health and /ready (from $%s)", args.api_key_env)
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: set $%s to require one", args.host, args.api_key_env)
    # The model loads on the GPU worker after the server is up: /health answers at once, /ready
    # turns 200 once the model is loaded and warm.
    app = create_app(settings=settings, loader=lambda: _load_engine(args))
    status = serve(app, args.host, args.port, log_level="debug" if args.verbose else "info")
    if status:
        print(f"error: {app.state.service.error}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from engine import ModelLoadError

    handlers = {"doctor": cmd_doctor, "edit": cmd_edit, "benchmark": cmd_benchmark, "serve": cmd_serve}
    try:
        return handlers[args.command](args)
    except (ModelLoadError, ValueError, OSError) as error:  # user-fixable: bad option, path or model
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
