"""The command line's parser. Optimization flags are generated from the config's own declarations
(stages/config.py), as vLLM generates its flags from its engine-args dataclass: a new knob appears
here without an edit. Nothing here imports torch, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path

from engine import __version__
from engine.lora_settings import DEFAULT_LORA_DIR, LORA_DIR_ENV, LORA_MODES, LoraSettings
from engine.memory_plan import TIERS
from engine.model_specs import HUB_DEFAULT, MODEL_ENV_VAR
from service.settings import API_KEY_ENV_DEFAULT, ServiceSettings
from stages.config import MAX_PRESET, USER_FIELDS, OptimizationConfig, cumulative_config, parse_presets

PRESET_ENV_VAR = "FLUX_KONTEXT_PRESET"
DEVICE_ENV_VAR = "FLUX_KONTEXT_DEVICE"
MEMORY_BUDGET_ENV_VAR = "FLUX_KONTEXT_MEMORY_BUDGET"
COMPILE_CACHE_HELP = (
    "directory for persistent compile artifacts (env FLUX_KONTEXT_COMPILE_CACHE; default ~/.cache/flux-kontext-optimized/inductor)"
)

DESCRIPTION = """FLUX.1-Kontext image editing, fast.

    serve       HTTP service on 127.0.0.1:8000 (--gpus: one worker process per GPU)
    fleet       the HTTP service as a Ray Serve application, one replica per GPU
    edit        edit one image (or generate one from the prompt alone)
    benchmark   stage-by-stage speed table under benchmarks/results/
    precompile  compile every reachable shape once and write a bundle that serve loads
    quantize    write a prequantized FP8 checkpoint that --model DIR loads without the bf16 weights
    doctor      torch/CUDA/GPU, packages, the memory plan, every stage's availability on this machine

--model picks the weights: a Hugging Face repo id or directory (default on a GPU:
black-forest-labs/FLUX.1-Kontext-dev), `tiny` (random weights, the default without a GPU) or
`synthetic-full` (the real architecture with random weights, for speed measurements)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one worth showing and the help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def add_optimization_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizations (each flag overrides the preset)")
    group.add_argument(
        "--preset",
        type=int,
        choices=range(0, MAX_PRESET + 1),
        default=None,
        help=f"cumulative benchmark stage to start from: 0 = plain diffusers ... {MAX_PRESET} = everything "
        f"(env {PRESET_ENV_VAR}; default {MAX_PRESET} on a CUDA GPU, 0 on a CPU)",
    )
    for name in USER_FIELDS:
        field = OptimizationConfig.model_fields[name]
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(kind), default=None, help=field.description)
        else:
            group.add_argument(flag, type=kind, default=None, help=f"{field.description} (default {field.default})")


def given_optimization_flags(args: argparse.Namespace) -> dict:
    """The optimization flags given on the command line (the preset aside)."""
    return {name: getattr(args, name) for name in USER_FIELDS if getattr(args, name, None) is not None}


def optimization_config_from_args(args: argparse.Namespace, has_cuda: bool, plan_changes: dict | None = None) -> OptimizationConfig:
    """The preset, then the memory plan's knobs, then every optimization flag that was given; ValueError on a bad value."""
    preset = args.preset
    if preset is None:
        preset = int(os.environ.get(PRESET_ENV_VAR, MAX_PRESET if has_cuda else 0))
    given = given_optimization_flags(args)
    try:
        return cumulative_config(preset).with_changes(**{**(plan_changes or {}), **given})
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"invalid optimization flag: {error}") from None


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=None,
        help=f"hub repo id, local directory, 'tiny' or 'synthetic-full' "
        f"(env {MODEL_ENV_VAR}; default {HUB_DEFAULT} on a GPU, tiny otherwise)",
    )
    common.add_argument(
        "--device",
        default=os.environ.get(DEVICE_ENV_VAR),
        help=f"cuda:N to pin one GPU, or cpu (env {DEVICE_ENV_VAR}; default cuda:0 if present)",
    )
    common.add_argument(
        "--memory-budget",
        type=float,
        default=os.environ.get(MEMORY_BUDGET_ENV_VAR),  # argparse converts a string default with `type`
        metavar="GB",
        help="GiB of GPU memory the model may use; picks the memory tier ("
        + ", ".join(f"{tier.name} >= {tier.min_free_gib:g}" if tier.min_free_gib else f"{tier.name} below" for tier in TIERS)
        + f"). Default: the GPU's free memory at startup (env {MEMORY_BUDGET_ENV_VAR})",
    )
    common.add_argument(
        "--max-variants", type=int, default=3, help="optimization variants kept built at once (least recently used is dropped)"
    )
    common.add_argument("--compile-cache", default=None, help=COMPILE_CACHE_HELP)
    common.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")
    add_optimization_options(common)
    add_lora_options(common)
    return common


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    d = LoraSettings()
    group = parser.add_argument_group("LoRA adapters (requests name them; files live in one directory)")
    group.add_argument(
        "--lora-dir",
        default=None,
        help=f"the adapter directory: NAME.safetensors files (env {LORA_DIR_ENV}; default ~/{DEFAULT_LORA_DIR.relative_to(Path.home())})",
    )
    group.add_argument(
        "--lora-mode",
        choices=LORA_MODES,
        default=d.mode,
        help="slots: adapters run beside the weights, any mix of requests, extra time per step; "
        "merge: adapters merged into the weights, no extra time per step, a restore and merge whenever the adapter set changes",
    )
    group.add_argument("--lora-slots", type=int, default=d.slots, help="adapters one request may combine")
    group.add_argument(
        "--lora-max-rank",
        type=int,
        default=d.max_rank,
        help="the largest adapter rank accepted; in slots mode every slot has this rank (memory, GEMM width)",
    )
    group.add_argument("--lora-max-mb", type=float, default=d.max_bytes / 2**20, help="adapter file size limit")
    group.add_argument("--lora-max-loaded", type=int, default=d.max_loaded, help="adapters kept loaded at once (in device memory)")


def lora_settings_from_args(args: argparse.Namespace, preload: tuple[str, ...] = ()) -> LoraSettings:
    return LoraSettings(
        directory=args.lora_dir,
        mode=args.lora_mode,
        slots=args.lora_slots,
        max_rank=args.lora_max_rank,
        max_bytes=int(args.lora_max_mb * 2**20),
        max_loaded=args.lora_max_loaded,
        preload=tuple(dict.fromkeys(preload)),  # each once, in the order given
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux_kontext_optimized.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = _common_parser()

    serve = commands.add_parser("serve", parents=[common], formatter_class=HelpFormatter, help="run the HTTP service")
    serve.add_argument(
        "--host", default=os.environ.get("FLUX_KONTEXT_HOST", "127.0.0.1"), help="bind address (0.0.0.0 exposes the service to the network)"
    )
    serve.add_argument("--port", type=int, default=int(os.environ.get("FLUX_KONTEXT_PORT", "8000")), help="TCP port")
    serve.add_argument(
        "--preload-lora",
        action="append",
        default=None,
        metavar="NAME",
        help="load this adapter from --lora-dir at start (repeatable); warm-up then also compiles the LoRA variant",
    )
    serve.add_argument(
        "--gpus",
        default=None,
        help="one worker process per GPU behind this server: 'all' or ids such as 0,1,3 (with --device cpu: that many "
        "CPU worker processes, for tests); default: one in-process worker on --device",
    )
    _add_service_options(serve)

    fleet = commands.add_parser(
        "fleet",
        parents=[common],
        formatter_class=HelpFormatter,
        help="the HTTP service as a Ray Serve application: one replica per GPU, on a local Ray instance or a cluster",
    )
    fleet.add_argument("--host", default=os.environ.get("FLUX_KONTEXT_HOST", "127.0.0.1"), help="where Ray's HTTP proxy listens")
    fleet.add_argument("--port", type=int, default=int(os.environ.get("FLUX_KONTEXT_PORT", "8000")), help="TCP port of Ray's HTTP proxy")
    _add_fleet_options(fleet)
    _add_service_options(fleet)

    edit = commands.add_parser("edit", parents=[common], formatter_class=HelpFormatter, help="edit one image (or generate one from text)")
    edit.add_argument("--image", type=Path, default=None, help="input image; omit to generate from the prompt alone")
    edit.add_argument("--prompt", required=True, help="the instruction, e.g. 'make the sky red'")
    edit.add_argument("--negative-prompt", default=None, help="negative prompt (used with --true-cfg-scale > 1)")
    edit.add_argument("--out", type=Path, default=None, help="output file (with several images: NAME_0.png, NAME_1.png, ...)")
    edit.add_argument("--output-dir", type=Path, default=Path("."), help="folder for outputs when --out is not given")
    edit.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    edit.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the scheduler's: 28 Euler, 14 DPM-Solver++, 20 UniPC)"
    )
    edit.add_argument("--num-images", type=int, default=1, help="images per prompt")
    edit.add_argument(
        "--aspect-ratio", default=None, help="a Kontext preferred resolution (1392x752) or a ratio (16:9); default: follow the input image"
    )
    edit.add_argument("--width", type=int, default=None, help="output width (multiple of 16)")
    edit.add_argument("--height", type=int, default=None, help="output height (multiple of 16)")
    edit.add_argument("--guidance-scale", type=float, default=2.5, help="distilled guidance")
    edit.add_argument("--true-cfg-scale", type=float, default=1.0, help="true CFG scale (> 1 with --negative-prompt; twice the cost)")
    edit.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="NAME[:SCALE]",
        help="apply the adapter NAME.safetensors from --lora-dir at SCALE (default 1.0); repeatable, up to --lora-slots",
    )

    bench = commands.add_parser("benchmark", parents=[common], formatter_class=HelpFormatter, help="stage-by-stage speed table")
    bench.add_argument("--stages", default=f"0-{MAX_PRESET}", help=f"cumulative presets to run, e.g. 0-{MAX_PRESET} or 0,1,4")
    bench.add_argument(
        "--rows",
        default="main,cache,options",
        help="which rows run: main (the presets), cache (first-block cache), options (off-by-default options)",
    )
    bench.add_argument(
        "--option-rows",
        default=None,
        help="which option rows run, by label, comma-separated, e.g. 'without fused_kernels' (default: all of them)",
    )
    bench.add_argument("--width", type=int, default=None, help="output width (default: 1024, 256 for tiny)")
    bench.add_argument("--height", type=int, default=None, help="output height (default: 1024, 256 for tiny)")
    bench.add_argument("--steps", type=int, default=None, help="denoising steps for every row (default: each preset's scheduler default)")
    bench.add_argument("--repeats", type=int, default=3, help="timed edits per row after warm-up")
    bench.add_argument("--warmup", type=int, default=1, help="untimed edits per row (compilation happens here)")
    bench.add_argument("--text-to-image", action="store_true", help="benchmark generation without an input image")
    bench.add_argument("--profile", action="store_true", help="GPU: add each preset's kernel-class breakdown (torch.profiler) to the table")
    bench.add_argument(
        "--results-dir", type=Path, default=None, help="where to write CSV/JSON/markdown/PNG (default benchmarks/results/<gpu>-<date>)"
    )

    precompile = commands.add_parser(
        "precompile",
        parents=[common],
        formatter_class=HelpFormatter,
        help="compile every shape a request can reach and write a compile-artifact bundle for serve --compile-artifacts",
    )
    precompile.add_argument(
        "--out", type=Path, default=None, help="bundle file (default: in the compile cache directory, where serve finds it)"
    )

    commands.add_parser(
        "doctor",
        parents=[common],
        formatter_class=HelpFormatter,
        help="print the environment, the memory plan and every stage's availability",
    )

    quantize = commands.add_parser(
        "quantize",
        parents=[common],
        formatter_class=HelpFormatter,
        help="write a prequantized FP8 checkpoint (the transformer; the T5 too with --t5-fp8)",
        description="Load --model, make its transformer FP8 (--transformer-fp8, default auto: rowwise where FP8 GEMMs run, "
        "weight_only elsewhere) and its T5 too with --t5-fp8, and write a pipeline directory in safetensors that "
        "--model DIR loads without ever holding the bf16 weights. The heavy components stay in host memory while it works.",
    )
    quantize.add_argument("--out", type=Path, required=True, help="new directory for the checkpoint")
    return parser


def _add_fleet_options(fleet: argparse.ArgumentParser) -> None:
    ray = fleet.add_argument_group("Ray Serve")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (one per GPU) when not autoscaling")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale between --min-replicas and this many replicas")
    ray.add_argument("--min-replicas", type=int, default=1, help="fewest replicas when autoscaling")
    ray.add_argument(
        "--target-queue-depth",
        type=float,
        default=2.0,
        help="autoscaling target: requests in each replica (running + waiting); more add replicas, fewer remove them",
    )
    ray.add_argument("--upscale-delay", type=float, default=30.0, help="seconds above the target before a replica is added")
    ray.add_argument("--downscale-delay", type=float, default=600.0, help="seconds below the target before a replica is removed")
    ray.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs Ray reserves for each replica (default: 1 where torch sees a GPU, else 0)",
    )
    ray.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (e.g. auto, or ray://head:10001); default: start a local one"
    )


def _add_service_options(serve: argparse.ArgumentParser) -> None:
    d = ServiceSettings()
    boolean = argparse.BooleanOptionalAction
    load = serve.add_argument_group("load and timeouts")
    load.add_argument(
        "--queue-size",
        type=int,
        default=d.queue_size,
        help="requests waiting for the GPU beyond the running one; more get 429 + Retry-After",
    )
    load.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout_s,
        help="seconds from arrival to answer, queued time included; beyond: 504",
    )
    load.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout_s,
        help="on SIGTERM, the most seconds the process waits for accepted work before it exits (the whole shutdown, connections included)",
    )
    load.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout_s,
        help="seconds a client may take to send its request body; slower uploads get 408",
    )
    load.add_argument(
        "--warmup",
        action=boolean,
        default=d.warmup,
        help="before /ready turns 200, run every shape a request can reach (builds, compiles, records)",
    )
    load.add_argument(
        "--compile-artifacts",
        type=Path,
        default=None,
        help="a bundle written by `precompile` (same GPU model and versions): loaded before the warm-up so that it compiles from cache "
        "(default: the bundle precompile left in the compile cache directory, if any)",
    )
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
    limits.add_argument("--min-size", type=int, default=None, help="smallest output side (default: 256 for real models, 16 for tiny)")
    limits.add_argument("--max-size", type=int, default=d.max_size, help="largest output side")
    limits.add_argument("--max-steps", type=int, default=d.max_steps, help="most denoising steps a request may ask for")
    limits.add_argument(
        "--default-steps",
        type=int,
        default=None,
        help="steps when a request gives none (default: the scheduler's: 28 Euler, 14 DPM-Solver++)",
    )
    limits.add_argument("--max-images", type=int, default=d.max_images, help="most images per request")
    security = serve.add_argument_group("security")
    security.add_argument(
        "--api-key-env",
        default=API_KEY_ENV_DEFAULT,
        help="environment variable holding the API key; when it is set, "
        "every endpoint but /health and /ready needs Authorization: Bearer <key>",
    )
    security.add_argument("--cors-origins", default="", help="comma-separated origins allowed by CORS; empty: CORS off")
    bench = serve.add_argument_group("/benchmark")
    bench.add_argument(
        "--benchmark-runs",
        choices=("auto", "on", "off"),
        default=d.benchmark_runs,
        help="may POST /benchmark start a run? auto: only on a loopback address or with an API key",
    )
    bench.add_argument(
        "--benchmark-stages", default=f"0-{MAX_PRESET}", help="presets a benchmark runs by default, and the only ones a run may pick"
    )
    bench.add_argument("--benchmark-repeats", type=int, default=None, help="timed edits per row (default: 3 on a GPU, 1 on a CPU)")
    bench.add_argument("--benchmark-warmup", type=int, default=d.benchmark_warmup, help="untimed edits per row")
    bench.add_argument("--benchmark-size", type=int, default=None, help="square output side (default: the model's default size)")
    bench.add_argument(
        "--benchmark-results-dir", type=Path, default=None, help="also write each finished table there (CSV/JSON/markdown/PNG)"
    )


def service_settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    return ServiceSettings(
        queue_size=args.queue_size,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        body_timeout_s=args.body_timeout,
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
        compile_artifacts=str(args.compile_artifacts) if args.compile_artifacts else None,
        api_key=ServiceSettings.api_key_from_env(args.api_key_env),
        cors_origins=tuple(origin.strip() for origin in args.cors_origins.split(",") if origin.strip()),
        host=args.host,
        benchmark_runs=args.benchmark_runs,
        benchmark_stages=tuple(parse_presets(args.benchmark_stages)),
        benchmark_warmup=args.benchmark_warmup,
        benchmark_repeats=args.benchmark_repeats,
        benchmark_size=args.benchmark_size,
        benchmark_results_dir=str(args.benchmark_results_dir) if args.benchmark_results_dir else None,
    )
