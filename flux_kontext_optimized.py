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
    import uvicorn

    from service.app import create_app

    engine = _load_engine(args)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")
    return 0


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
