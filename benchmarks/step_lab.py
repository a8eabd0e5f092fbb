"""One transformer step under the microscope: inductor settings, a kernel-level profile, VAE layouts.

    python -m benchmarks.step_lab --model synthetic-full inductor   # which inductor settings are fastest
    python -m benchmarks.step_lab --model synthetic-full profile    # where a step's time goes, by kernel class
    python -m benchmarks.step_lab --model synthetic-full vae        # eager/compiled x NCHW/NHWC VAE

The transformer's inputs are captured from a real 1024x1024 edit (8192 image + 512 text tokens),
then each configuration's variant is built by the engine and timed on exactly those inputs
(CUDA events, median). Results go to benchmarks/results/<gpu>-<date>/step_lab_<experiment>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from engine.benchmark.kernels import capture_transformer_inputs, kernel_class
from engine.benchmark.report import BenchmarkReport, default_results_dir
from engine.benchmark.roofline import median_cuda_ms
from engine.benchmark.runner import benchmark_input_image, environment_meta
from engine.engine import KontextEngine
from engine.requests import EditRequest
from stages.config import OptimizationConfig, cumulative_config

INDUCTOR_CANDIDATES = {
    "default": {},
    "coordinate_descent": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
    "max_autotune_no_cudagraphs": {"max_autotune": True, "max_autotune_gemm": True, "coordinate_descent_tuning": True},
    # Inductor's Triton GEMM templates (FP8 scaled_mm included) against cuBLAS, each shape tuned
    # once, with epilogues fused without benchmarking every fusion: the bounded form of the above.
    "gemm_templates": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN", "benchmark_epilogue_fusion": False},
}


def time_step_ms(transformer, inputs: dict, repeats: int = 10) -> tuple[float, float]:
    """(first call seconds, median ms of the following calls)."""
    start = time.perf_counter()
    with torch.no_grad():
        transformer(**inputs)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        median = median_cuda_ms(lambda: transformer(**inputs), warmup=0, repeats=repeats)
    return first, median


def _transformer_for(engine: KontextEngine, config: OptimizationConfig):
    pipe, _, _ = engine.variants.pipeline_for(engine.resolve(config).effective)
    return pipe.transformer


def experiment_inductor(engine: KontextEngine, inputs: dict, stages: list[int], candidates: list[str]) -> list[dict]:
    """Each candidate replaces the compile stage's INDUCTOR_SETTINGS (the options its torch.compile
    calls receive, whatever `compile_tuning` says) for a fresh build and compile of each stage's variant."""
    import torch._dynamo

    from stages import compile as compile_stage  # its INDUCTOR_SETTINGS are swapped per candidate

    shipped = compile_stage.INDUCTOR_SETTINGS
    rows = []
    try:
        for name in candidates:
            torch._dynamo.reset()  # forget compiled code: every candidate compiles from scratch
            compile_stage.INDUCTOR_SETTINGS = {tuning: INDUCTOR_CANDIDATES[name] for tuning in shipped}
            for stage in stages:
                engine.variants._executions.clear()
                config = cumulative_config(stage).with_changes(first_block_cache=False)
                first, median = time_step_ms(_transformer_for(engine, config), inputs)
                rows.append(
                    {"settings": name, "stage": stage, "compile_and_first_call_s": round(first, 1), "median_step_ms": round(median, 2)}
                )
                print(rows[-1], flush=True)
    finally:
        compile_stage.INDUCTOR_SETTINGS = shipped
    return rows


def experiment_profile(engine: KontextEngine, inputs: dict, stages: list[int]) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for stage in stages:
        config = cumulative_config(stage).with_changes(first_block_cache=False)
        transformer = _transformer_for(engine, config)
        time_step_ms(transformer, inputs, repeats=2)  # compile and warm up outside the profile
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                transformer(**inputs)
            torch.cuda.synchronize()
        by_class: dict[str, float] = {}
        kernels = []
        for event in prof.key_averages():
            cuda_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            if cuda_us <= 0 or event.key.startswith("ProfilerStep"):
                continue
            kind = kernel_class(event.key)
            by_class[kind] = by_class.get(kind, 0.0) + cuda_us / 3 / 1000
            kernels.append((cuda_us / 3 / 1000, event.count // 3, kind, event.key[:120]))
        kernels.sort(reverse=True)
        row = {
            "stage": stage,
            "ms_per_step_by_class": {k: round(v, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "top_kernels": [
                {"ms_per_step": round(ms, 2), "calls_per_step": calls, "class": kind, "name": name}
                for ms, calls, kind, name in kernels[:40]
            ],
        }
        from torch._dynamo.utils import counters

        row["inductor_counters"] = {key: dict(value) for key, value in counters.items() if key in ("inductor", "graph_break")}
        rows.append(row)
        print(stage, json.dumps(row["ms_per_step_by_class"]), json.dumps(row["inductor_counters"])[:600], flush=True)
    return rows


def experiment_vae(engine: KontextEngine, size: int) -> list[dict]:
    import copy

    vae = engine.loaded.pipe.vae
    image = torch.randn(1, 3, size, size, device="cuda", dtype=engine.loaded.dtype)
    rows = []
    for layout in ("nchw", "nhwc"):
        for compiled in (False, True):
            model = copy.deepcopy(vae)
            if layout == "nhwc":
                model.to(memory_format=torch.channels_last)
            if compiled:
                model.encoder.compile(fullgraph=True)
                model.decoder.compile(fullgraph=True)
            with torch.no_grad():
                start = time.perf_counter()
                latents = model.encode(image).latent_dist.mode()
                model.decode(latents)
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                encode = median_cuda_ms(lambda: model.encode(image).latent_dist.mode(), warmup=2, repeats=10)
                decode = median_cuda_ms(lambda: model.decode(latents), warmup=2, repeats=10)
            rows.append(
                {
                    "layout": layout,
                    "compiled": compiled,
                    "first_call_s": round(first, 1),
                    "encode_ms": round(encode, 2),
                    "decode_ms": round(decode, 2),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["inductor", "profile", "vae"])
    parser.add_argument("--model", default="synthetic-full")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--candidates", default=",".join(INDUCTOR_CANDIDATES))
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<gpu>-<date>)")
    args = parser.parse_args(argv)

    from engine.compile_cache import configure_compile_cache

    configure_compile_cache()
    engine = KontextEngine.load(args.model, "cuda:0", max_variants=2)
    stages = [int(s) for s in args.stages.split(",")]
    request = EditRequest(
        prompt="make the sky red", image=benchmark_input_image(args.size, args.size), width=args.size, height=args.size, seed=0
    )
    if args.experiment == "vae":
        rows = experiment_vae(engine, args.size)
    else:
        inputs = capture_transformer_inputs(engine, request)
        if args.experiment == "inductor":
            rows = experiment_inductor(engine, inputs, stages, args.candidates.split(","))
        else:
            rows = experiment_profile(engine, inputs, stages)
    meta = environment_meta(engine)
    directory = args.out or default_results_dir(BenchmarkReport(meta, []))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"step_lab_{args.experiment}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"written to {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
