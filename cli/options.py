"""The command line's parser, generated from the declarations, as vLLM generates its flags from its
engine-args dataclass: the optimization flags from the knobs (stages/config.py), and the engine's,
the LoRA and the service's settings from their fields (cli/engine_loader.py, engine/lora_settings.py,
service/settings.py; engine/setting.py says how a field declares its flag). A new knob or setting
appears here without an edit. Nothing here imports torch, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from engine import __version__
from engine.lora_settings import LoraSettings
from engine.setting import DeclaredField, declared_fields
from service.settings import ServiceSettings
from stages.config import MAX_PRESET, USER_FIELDS, OptimizationConfig

from .engine_loader import PRESET_ENV_VAR, EngineOptions, optimization_config

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
        if action.default in (None, argparse.SUPPRESS, False, ()) or "default" in text:
            return text
        return super()._get_help_string(action)


# -- declared settings -> flags ---------------------------------------------------------------------
def _dest(field: DeclaredField) -> str:
    return field.flag.lstrip("-").replace("-", "_")


def _reader(field: DeclaredField):
    """argparse's `type`: the declared parser or the field's type, with ValueError's words kept."""
    read = field.setting.parse or field.kind

    def parse(text: str):
        try:
            return read(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = getattr(read, "__name__", "value")
    return parse


def add_settings(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per declared field of `cls` (engine/setting.py), listed under the field's group."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in declared_fields(cls):
        group = groups.get(field.setting.group) or groups.setdefault(field.setting.group, parser.add_argument_group(field.setting.group))
        options: dict = {"dest": _dest(field), "help": field.setting.help, "default": field.env_default()}
        if field.setting.metavar:
            options["metavar"] = field.setting.metavar
        if field.setting.repeat:
            options.update(action="append", default=None, type=_reader(field) if field.setting.parse else str)
        elif field.kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(field.kind) is typing.Literal:
            options["choices"] = typing.get_args(field.kind)
        else:
            options["type"] = _reader(field)
        group.add_argument(field.flag, **options)


def settings_from_args(cls, args: argparse.Namespace, **extra):
    """An instance of `cls` from the flags `add_settings` made (fields whose flag this command lacks keep
    their default); `extra` adds values from elsewhere (repeatable flags are joined to them, in order)."""
    values = {}
    for field in declared_fields(cls):
        value = getattr(args, _dest(field), None) if hasattr(args, _dest(field)) else field.default
        if field.setting.repeat:
            value = tuple(dict.fromkeys((*extra.pop(field.name, ()), *(value or ()))))
        values[field.name] = value
    values.update(extra)
    build = getattr(cls, "from_options", None)
    return build(values) if build else cls(**values)


# -- optimization flags (generated from the knobs) ----------------------------------------------------
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
    return optimization_config(args.preset, given_optimization_flags(args), has_cuda, plan_changes)


def engine_options_from_args(args: argparse.Namespace, preload: tuple[str, ...] = ()) -> EngineOptions:
    """Everything loading an engine needs, as one picklable object (worker processes and Ray replicas
    receive this, never the Namespace); `preload` adds adapters to load at start."""
    lora = settings_from_args(LoraSettings, args, preload=preload)
    return settings_from_args(EngineOptions, args, preset=args.preset, optimizations=given_optimization_flags(args), lora=lora)


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_settings(common, EngineOptions)
    common.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")
    add_optimization_options(common)
    add_settings(common, LoraSettings)
    return common


# -- the commands ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux_kontext_optimized.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = _common_parser()

    serve = commands.add_parser("serve", parents=[common], formatter_class=HelpFormatter, help="run the HTTP service")
    serve.add_argument(
        "--gpus",
        default=None,
        help="one worker process per GPU behind this server: 'all' or ids such as 0,1,3 (with --device cpu: that many "
        "CPU worker processes, for tests); default: one in-process worker on --device",
    )
    add_settings(serve, ServiceSettings)

    fleet = commands.add_parser(
        "fleet",
        parents=[common],
        formatter_class=HelpFormatter,
        help="the HTTP service as a Ray Serve application: one replica per GPU, on a local Ray instance or a cluster",
    )
    _add_fleet_options(fleet)
    add_settings(fleet, ServiceSettings)

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
    precompile.add_argument(
        "--aot-compile",
        action="store_true",
        help="experimental: also save the compiled blocks and VAE as ahead-of-time functions (torch's aot_compile), which "
        "serve runs without Dynamo tracing; units torch cannot save (FP8 weights) compile at start-up as before",
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


def service_settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    return settings_from_args(ServiceSettings, args)
