"""Memory tiers on one GPU: every tier in its own process, capped to its budget.

    python -m benchmarks.memory_tiers --model synthetic-full --out DIR      # H100/H200: about 5 minutes
    python -m benchmarks.memory_tiers --model tiny --device cpu --out DIR   # the same run on a CPU, tiny sizes

Jobs, one process each (spawned: a fresh interpreter, so every job starts with a clean GPU and its
own peak counters, and none can inherit a CUDA context; a fork server that preloaded torch, diffusers
and torchao had passed on an H100 and failed every job on an H200, 2026-12-04):

    prepare  build --model (seeded), write its bf16 transformer and a prequantized FP8 pipeline (T5 in
             FP8 too; the `quantize` command's code path) to --work-dir
    load     the transformer alone, read three ways onto the device: a bf16 checkpoint quantized on the
             GPU (as the large tier's FP8 variant is built), a bf16 checkpoint quantized while read (what
             the other tiers do with a bf16 checkpoint), the prequantized checkpoint. Load time, peak
             host memory above the process's start, peak GPU memory.
    tier     large (--model as today), then medium, small, small with the text encoders on the CPU, and
             tiny (the prequantized pipeline), each under torch.cuda.set_per_process_memory_fraction of
             its budget (the CUDA context, about half a GiB, is not counted): load, warm-up, timed edits;
             peak allocated and reserved memory, median step, end-to-end time, a memory timeline.

Every row runs the full stack by default: --preset 5 (compile, fused QKV, FP8 GEMMs, FP8 attention,
CUDA graphs where the GPU has them) with its tier's memory knobs, as a server started with its
defaults would; stages that cannot run (the tiny tier's compile with offloaded FP8 weights, anything
needing a GPU on a CPU) are listed with their reasons. A row named ROW-eager (e.g. small-eager) runs
with compile off, and --no-compile makes every row eager (the tier results before issue 23). The
first warm-up edit is the cold start: it builds the variant and compiles (`cold_compile_s` is its
time beyond a warm edit; each row compiles into an empty cache of its own unless
--shared-compile-cache). Writes memory_tiers.json, memory_tiers.md and memory_tiers.png (memory
against time per tier) into --out; the checkpoints (about 45 GB for synthetic-full) stay in
--work-dir until the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import threading
import time
import traceback
from pathlib import Path

SEED = 20261123
DEFAULT_BUDGETS = {"medium": 24.0, "small": 22.0, "tiny": 12.0}  # large: the whole GPU
SMALL_TIER_TARGET_GIB = 22.0  # the target: the small tier peaks under this on a 24 GB card
TIER_ROWS = {  # row -> (tier, knobs that differ from the tier's own)
    "large": ("large", {}),
    "medium": ("medium", {}),
    "small": ("small", {}),
    "small-cpu-text": ("small", {"text_encoders": "cpu"}),
    "tiny": ("tiny", {}),
}
# The T5 on the CPU may take seconds per request: that row times one edit, to keep the run near 5 minutes.
ROW_REPEATS = {"small-cpu-text": 1}
EAGER_SUFFIX = "-eager"  # a row option: the row with compile off
LOAD_ROWS = ("bf16, quantized on the GPU", "bf16, quantized while read", "prequantized")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-full", help="synthetic-full on a GPU, tiny on a CPU")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON, markdown and chart go")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/memory_tiers_work"), help="checkpoints and per-job results")
    parser.add_argument("--rows", default=",".join(TIER_ROWS), help=f"tier rows to run, of {', '.join(TIER_ROWS)}")
    parser.add_argument("--budgets", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_BUDGETS.items()), help="GiB per tier")
    parser.add_argument("--size", type=int, default=None, help="square output side (default 1024; 256 for tiny)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per edit")
    parser.add_argument("--repeats", type=int, default=2, help="timed edits per tier")
    parser.add_argument("--warmup", type=int, default=1, help="untimed edits per tier")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the checkpoints")
    parser.add_argument("--preset", type=int, default=5, help="cumulative stage preset every row starts from (default 5: the full stack)")
    parser.add_argument("--no-compile", action="store_true", help=f"compile off in every row (one row: name it ROW{EAGER_SUFFIX})")
    parser.add_argument("--no-loads", action="store_true", help="skip the three load jobs (the transformer read three ways)")
    parser.add_argument(
        "--shared-compile-cache", action="store_true",
        help="one compile cache for every row (later rows reuse what earlier ones compiled); default: each row its own empty one",
    )  # fmt: skip
    parser.add_argument(
        "--row-limit-s", type=float, default=1200.0,
        help="a job still running after this many seconds is stopped and becomes a row with that error: one stall does not hold the rest",
    )  # fmt: skip
    parser.add_argument(
        "--stack-dumps-every", type=float, default=0.0,
        help="seconds between dumps of each job's Python stacks into OUT/stacks/JOB.txt (0: none): where a stalled job spent its time",
    )  # fmt: skip
    args = parser.parse_args(argv)

    budgets = {name: float(value) for name, value in (item.split("=") for item in args.budgets.split(",") if item)}
    rows = [row for row in args.rows.split(",") if row]
    unknown = {row for row in rows if row.removesuffix(EAGER_SUFFIX) not in TIER_ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(TIER_ROWS)}, each also as ROW{EAGER_SUFFIX}")
    size = args.size or (256 if args.model == "tiny" else 1024)
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    (work / "results").mkdir(parents=True)
    started = time.perf_counter()
    common = {"model": args.model, "device": args.device, "work": str(work), "limit_s": args.row_limit_s}
    if args.stack_dumps_every > 0:
        common["stack_dumps"] = {"every_s": args.stack_dumps_every, "dir": str(args.out / "stacks")}
    results = {"prepare": _run("prepare", {**common, "job": "prepare"}, work)}
    loads = {}
    if "error" not in results["prepare"] and not args.no_loads:
        for name in LOAD_ROWS:
            loads[name] = _run(f"load-{LOAD_ROWS.index(name)}", {**common, "job": "load", "how": name}, work)
    tiers = {}
    for row in rows:
        tier, overrides = TIER_ROWS[row.removesuffix(EAGER_SUFFIX)]
        if args.no_compile or row.endswith(EAGER_SUFFIX):
            overrides = {**overrides, "compile": False}
        source = args.model if tier == "large" else str(work / "prequantized")
        job = {**common, "job": "tier", "row": row, "tier": tier, "source": source, "overrides": overrides, "budget": budgets.get(tier)}
        # an empty cache per row, so that each row's first edit is its own cold compile
        job["compile_cache"] = str(work / "compile-cache" / ("shared" if args.shared_compile_cache else row))
        repeats = min(args.repeats, ROW_REPEATS.get(row.removesuffix(EAGER_SUFFIX), args.repeats))
        job.update(size=size, steps=args.steps, repeats=repeats, warmup=args.warmup, preset=args.preset)
        tiers[row] = _run(f"tier-{row}", job, work) if "error" not in results["prepare"] else {"error": "prepare failed"}
    from .memory_tiers_report import compare_images, write_report

    compare_images(tiers, work / "images")
    report = {
        "command": {**vars(args), "out": str(args.out), "work_dir": str(args.work_dir), "size": size, "budgets": budgets},
        "prepare": results["prepare"],
        "loads": loads,
        "tiers": tiers,
        "small_tier_target_gib": SMALL_TIER_TARGET_GIB,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_report(report, args.out)
    if not args.keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print((args.out / "memory_tiers.md").read_text())
    return 0 if all("error" not in row for row in [results["prepare"], *loads.values(), *tiers.values()]) else 1


# -- the parent: one process per job -----------------------------------------------------------------
def _run(name: str, job: dict, work: Path) -> dict:
    context = multiprocessing.get_context("spawn")
    result_path = work / "results" / f"{name}.json"
    started = time.perf_counter()
    process = context.Process(target=run_job, args=(job, str(result_path)), name=name)
    process.start()
    process.join(job["limit_s"])
    if process.is_alive():
        process.kill()
        process.join()
        result = {"error": f"the {name} process was still running after {job['limit_s']:.0f} s and was stopped"}
    elif result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {"error": f"the {name} process exited with code {process.exitcode} and left no result"}
    result["process_s"] = round(time.perf_counter() - started, 1)
    print(f"{name}: {result.get('error') or 'done'} ({result['process_s']} s)", flush=True)
    return result


def run_job(job: dict, result_path: str) -> None:
    """In the job's own process: run it, write its result (or its error) as JSON."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    if "stack_dumps" in job:
        from .with_stack_dumps import start_stack_dumps

        dumps = job["stack_dumps"]
        start_stack_dumps(dumps["every_s"], Path(dumps["dir"]) / f"{Path(result_path).stem}.txt")
    try:
        result = JOBS[job["job"]](job)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row that says what happened
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
        result["traceback"] = traceback.format_exc(limit=8)
    Path(result_path).write_text(json.dumps(result, indent=1, default=str))


# -- the jobs ----------------------------------------------------------------------------------------
def prepare(job: dict) -> dict:
    """The bf16 transformer and the prequantized pipeline, both from the same seeded weights."""
    import torch

    from engine.checkpoints import WRITING_KNOBS, save_prequantized
    from engine.engine import KontextEngine
    from engine.loading import load_model
    from stages.config import OptimizationConfig
    from stages.environment import current_environment

    env = current_environment(job["device"])
    work = Path(job["work"])
    torch.manual_seed(SEED)
    started = time.perf_counter()
    loaded = load_model(job["model"], env.device)
    built_s = time.perf_counter() - started
    loaded.pipe.transformer.save_pretrained(work / "bf16" / "transformer")
    saved_bf16_s = time.perf_counter() - started - built_s
    engine = KontextEngine(loaded, env, OptimizationConfig(**WRITING_KNOBS, t5_fp8=True))  # the load stages quantize in place
    manifest = save_prequantized(engine.loaded.pipe, work / "prequantized", source=job["model"], knobs={**WRITING_KNOBS, "t5_fp8": True})
    return {
        "built_s": round(built_s, 1),
        "bf16_transformer_written_s": round(saved_bf16_s, 1),
        "prequantized_written_s": round(time.perf_counter() - started - built_s - saved_bf16_s, 1),
        "format": manifest["format"],
        "gib_on_disk": {name: round(_directory_bytes(work / name) / 2**30, 2) for name in ("bf16", "prequantized")},
    }


def load(job: dict) -> dict:
    """The transformer alone, read onto the device one of three ways (LOAD_ROWS)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from torchao.quantization import quantize_

    from engine.loading import compute_dtype
    from stages.config import OptimizationConfig
    from stages.environment import current_environment
    from stages.low_precision import is_quantized_linear
    from stages.registry import resolve
    from stages.transformer_fp8 import checkpoint_config, weight_config

    env = current_environment(job["device"])
    device, work = torch.device(env.device), Path(job["work"])
    dtype = compute_dtype(device)
    fmt = resolve(OptimizationConfig(transformer_fp8="auto"), env).effective.transformer_fp8
    memory = _Memory(env)
    started = time.perf_counter()
    if job["how"] == "prequantized":
        options = dict(torch_dtype=dtype, use_safetensors=True)  # the dtype of what stays unquantized
        transformer = FluxTransformer2DModel.from_pretrained(work / "prequantized", subfolder="transformer", **options)
        transformer.to(device)
    elif job["how"] == "bf16, quantized while read":
        options = dict(torch_dtype=dtype, use_safetensors=True, quantization_config=checkpoint_config(fmt))
        transformer = FluxTransformer2DModel.from_pretrained(work / "bf16", subfolder="transformer", **options)
        transformer.to(device)
    else:
        transformer = FluxTransformer2DModel.from_pretrained(
            work / "bf16", subfolder="transformer", torch_dtype=dtype, use_safetensors=True
        )
        transformer.to(device)
        quantize_(transformer, weight_config(fmt), filter_fn=is_quantized_linear)
    memory.synchronize()
    return {"how": job["how"], "format": fmt, "load_s": round(time.perf_counter() - started, 2), **memory.peaks()}


def tier(job: dict) -> dict:
    """One tier under its budget: load, warm-up, timed edits, with a memory timeline."""
    import torch

    from engine.benchmark.runner import benchmark_input_image
    from engine.compile_cache import configure_compile_cache
    from engine.engine import KontextEngine
    from engine.memory_plan import choose_memory_plan
    from engine.requests import EditRequest
    from stages.config import cumulative_config
    from stages.environment import current_environment

    configure_compile_cache(job["compile_cache"])
    env = current_environment(job["device"])
    budget = job["budget"]
    if env.has_cuda and budget is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / env.gpu.total_memory_bytes), env.gpu.index)
    plan = choose_memory_plan(env, budget)
    if plan.tier.name != job["tier"]:
        raise RuntimeError(f"a budget of {budget} GiB selects the {plan.tier.name} tier, not {job['tier']}: fix --budgets")
    config = cumulative_config(job["preset"]).with_changes(**{**plan.changes, **job["overrides"]})
    memory = _Memory(env, timeline=True)
    if job["tier"] == "large":
        torch.manual_seed(SEED)  # the same weights the prequantized checkpoint was made from
    with memory.phase("load"):
        started = time.perf_counter()
        engine = KontextEngine.load(job["source"], env.device, config, memory_plan=plan)
        memory.synchronize()
        load_s = time.perf_counter() - started
    load_peaks = memory.peaks(reset=True)
    size = job["size"]
    request = EditRequest("make the sky red", image=benchmark_input_image(size, size), width=size, height=size, steps=job["steps"], seed=0)
    # The first edit builds the variant and compiles (and records CUDA graphs): the cold start. A
    # compiled row warms up at least once, so that no timed edit compiles.
    warmups = max(job["warmup"], 1 if engine.resolve().effective.compile else 0)
    cold_s = None
    with memory.phase("warm-up"):
        for index in range(warmups):
            started = time.perf_counter()
            engine.edit(request)
            cold_s = time.perf_counter() - started if index == 0 else cold_s
    warm_peaks = memory.peaks(reset=True)
    results, walls = [], []
    with memory.phase("timed edits"):
        for _ in range(job["repeats"]):
            started = time.perf_counter()
            results.append(engine.edit(request))
            walls.append(time.perf_counter() - started)
    timed_peaks = memory.peaks()
    images = Path(job["work"]) / "images"
    images.mkdir(exist_ok=True)
    results[-1].images[0].save(images / f"{job['row']}.png")
    resolved = engine.resolve()
    steps = [s for result in results for s in result.timings.step_s]
    median_edit_s = statistics.median(r.timings.total_s for r in results)
    return {
        "row": job["row"],
        "plan": plan.as_dict(),
        "estimated_peak_gib": plan.tier.estimated_peak_with(resolved.effective.compile, resolved.effective.cuda_graphs),
        "budget_gib": budget,
        "knobs": engine.memory_report()["loaded_knobs"],
        "active_stages": resolved.active_stages,
        "skipped_stages": resolved.skipped,
        "compile": resolved.effective.compile,
        "cuda_graphs": resolved.effective.cuda_graphs,
        "config": resolved.effective.describe(),
        "load_s": round(load_s, 2),
        "cold_first_edit_s": None if cold_s is None else round(cold_s, 2),
        "cold_compile_s": None if cold_s is None or not resolved.effective.compile else round(max(0.0, cold_s - median_edit_s), 2),
        "median_step_ms": round(statistics.median(steps) * 1e3, 2),
        "median_edit_s": round(median_edit_s, 3),
        "median_wall_s": round(statistics.median(walls), 3),
        "median_text_encode_s": round(statistics.median(r.timings.text_encode_s for r in results), 3),
        "median_vae_s": round(statistics.median(r.timings.vae_encode_s + r.timings.vae_decode_s for r in results), 3),
        "memory": {"load": load_peaks, "warm-up": warm_peaks, "timed edits": timed_peaks},
        "timeline": memory.timeline(),
        "phases": memory.phases,
        "size": size,
        "steps": job["steps"],
    }


JOBS = {"prepare": prepare, "load": load, "tier": tier}


class _Memory:
    """Peak GPU memory (allocated and reserved) and host memory above the start, and a sampled timeline."""

    def __init__(self, env, timeline: bool = False, interval_s: float = 0.02):
        import torch

        self.torch, self.cuda = torch, env.has_cuda
        self.index = env.gpu.index if env.has_cuda else None
        self.start = time.perf_counter()
        self.host_start = _rss_bytes()
        self.phases: list[tuple[str, float, float]] = []
        self._samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.index)
            if timeline:
                threading.Thread(target=self._sample, args=(interval_s,), daemon=True).start()

    def _sample(self, interval_s: float) -> None:
        gib = 2**30
        while not self._stop.wait(interval_s):
            allocated = self.torch.cuda.memory_allocated(self.index) / gib
            self._samples.append((time.perf_counter() - self.start, allocated, self.torch.cuda.memory_reserved(self.index) / gib))

    def phase(self, name: str):
        memory = self

        class Phase:
            def __enter__(self):
                self.began = time.perf_counter() - memory.start

            def __exit__(self, *exc):
                memory.phases.append((name, round(self.began, 2), round(time.perf_counter() - memory.start, 2)))

        return Phase()

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.index)

    def peaks(self, reset: bool = False) -> dict:
        host = {"peak_host_gib_above_start": round((_max_rss_bytes() - self.host_start) / 2**30, 2)}
        if not self.cuda:
            return {**host, "gpu": "cpu: not measured"}
        gib = 2**30
        peaks = {
            "peak_allocated_gib": round(self.torch.cuda.max_memory_allocated(self.index) / gib, 2),
            "peak_reserved_gib": round(self.torch.cuda.max_memory_reserved(self.index) / gib, 2),
            "allocated_gib": round(self.torch.cuda.memory_allocated(self.index) / gib, 2),
        }
        if reset:
            self.torch.cuda.reset_peak_memory_stats(self.index)
        return {**host, **peaks}

    def timeline(self, points: int = 400) -> list[tuple[float, float, float]]:
        self._stop.set()
        stride = max(1, len(self._samples) // points)
        return [tuple(round(value, 3) for value in sample) for sample in self._samples[::stride]]


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


if __name__ == "__main__":
    raise SystemExit(main())
