"""LoRA on the full stack, in one of the two modes (serve --lora-mode): adapter load and swap times,
step time with one and two adapters against none, new compiled graphs after swaps (must be 0), peak
memory. Writes lora.json and lora.md. What each mode does to the picture: benchmarks/lora_fidelity.py
(one process: synthetic-full's random weights differ from one process to the next).

    python -m benchmarks.lora_bench --model synthetic-full --out benchmarks/results/lora-<gpu>-<date>
    python -m benchmarks.lora_bench --model tiny --device cpu --size 64 --steps 2 --repeats 1 --out /tmp/lora-cpu
    python -m benchmarks.lora_bench --model tiny --device cpu --size 64 --steps 2 --repeats 1 --mode merge --out /tmp/lora-cpu-merge

Two adapters are made in code with peft (rank 32 by default, every attention and MLP Linear of the
blocks), saved in diffusers' layout into a temporary LoRA directory and loaded through the engine's
library, as a server loads them. The config is the cumulative preset (5: everything) with the
first-block cache off, whose skips on random weights would mean nothing. After warm-up (compiling
the variants with and without LoRA slots), a sequence of swaps runs (other adapters, other scales,
scale 0, none), then timed edits interleave none / one / two adapters, so that in merge mode every
timed edit changes the adapter set (the worst case: a restore and a merge each time). Exits 1 when a
swap compiled anything, scale 0 did not reproduce the output without adapters bit for bit, or the
output without adapters after all the swaps is not the first one bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SETS = {"none": (), "one adapter": (("bench_a", 1.0),), "two adapters": (("bench_a", 0.8), ("bench_b", 0.6))}
SWAPS = [
    (("bench_a", 0.5),),
    (("bench_b", 1.0),),
    (("bench_a", 0.7), ("bench_b", 1.3)),
    (("bench_b", 0.2), ("bench_a", 1.1)),
    (("bench_a", -0.4),),
    (("bench_a", 0.0),),  # runs the variant without LoRA layers
    (),
    (("bench_a", 1.0),),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-full")
    parser.add_argument("--device", default=None, help="default: cuda:0 if present")
    parser.add_argument("--preset", type=int, default=5, help="cumulative preset (the first-block cache is always off)")
    parser.add_argument("--mode", choices=("slots", "merge"), default="slots", help="how adapters run (serve --lora-mode)")
    parser.add_argument("--rank", type=int, default=32, help="rank of the two adapters made in code")
    parser.add_argument("--slots", type=int, default=None, help="LoRA slots (default: the server's default)")
    parser.add_argument("--max-rank", type=int, default=None, help="slot rank (default: the server's default)")
    parser.add_argument("--size", type=int, default=None, help="square output side (default: the model's default size)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset scheduler's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed edits per adapter set (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=5, help="timed edits per adapter set")
    parser.add_argument("--compile-cache", default=None, help="persistent compile artifacts (default as the server's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from engine.compile_cache import configure_compile_cache

    configure_compile_cache(args.compile_cache)
    import torch
    from torch._dynamo.utils import counters

    from benchmarks.lora_adapters import block_targets, random_adapter, save_diffusers
    from engine.benchmark.runner import benchmark_input_image, environment_meta
    from engine.engine import KontextEngine
    from engine.lora_settings import LoraSettings
    from engine.requests import EditRequest, LoraChoice
    from stages.config import cumulative_config

    defaults = LoraSettings()
    lora_dir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    settings = LoraSettings(
        directory=str(lora_dir), mode=args.mode, slots=args.slots or defaults.slots, max_rank=args.max_rank or defaults.max_rank
    )
    config = cumulative_config(args.preset).with_changes(first_block_cache=False)
    engine = KontextEngine.load(args.model, args.device, config, lora=settings)
    cuda = engine.env.has_cuda
    report: dict = {
        "model": args.model,
        "mode": args.mode,
        "config": engine.resolve(config).effective.describe(),
        "adapter_rank": args.rank,
        "slots": settings.slots,
        "slot_rank": settings.max_rank,
    }
    try:
        report["adapters"] = _make_and_load(engine, lora_dir, args.rank, random_adapter, save_diffusers, block_targets)
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)  # the adapters live in device memory now

    side = args.size or int(engine.loaded.spec.default_max_area**0.5)
    image = benchmark_input_image(side, side)
    base = EditRequest(prompt="make the sky red", image=image, width=side, height=side, steps=args.steps, seed=0)

    def run(loras):
        request = dataclasses.replace(base, loras=tuple(LoraChoice(name, scale) for name, scale in loras))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = engine.edit(request)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return result, peak

    report["first_edit_s"] = {}
    first_base = None  # the first picture without adapters, bit for bit, to compare the last one with
    for label, loras in SETS.items():  # warm-up: the first edit of each variant compiles it
        for index in range(args.warmup):
            started = time.perf_counter()
            result, _ = run(loras)
            if first_base is None and not loras:
                first_base = result.images[0].tobytes()
            if index == 0:
                report["first_edit_s"][label] = round(time.perf_counter() - started, 2)

    graphs, inductor = counters["stats"]["unique_graphs"], dict(counters["inductor"])
    swap_images = {}
    for loras in SWAPS:
        result, _ = run(loras)
        swap_images[loras] = result.images[0].tobytes()
    rows = {label: {"step_s": [], "edit_s": [], "swap_ms": [], "restore_ms": [], "peak_gb": []} for label in SETS}
    for _ in range(args.repeats):  # interleaved, so that drift (clocks, heat) hits every set alike
        for label, loras in SETS.items():
            result, peak = run(loras)
            row = rows[label]
            row["step_s"].append(result.timings.median_step_s)
            row["edit_s"].append(result.timings.total_s)
            if "lora" in result.extras:
                row["swap_ms"].append(result.extras["lora"]["swap_s"] * 1e3)
                if "restore_s" in result.extras["lora"]:
                    row["restore_ms"].append(result.extras["lora"]["restore_s"] * 1e3)
            if peak is not None:
                row["peak_gb"].append(peak)
    report["swaps"] = len(SWAPS)
    report["new_graphs_after_warmup"] = counters["stats"]["unique_graphs"] - graphs
    moved = {key: value - inductor.get(key, 0) for key, value in counters["inductor"].items() if value != inductor.get(key, 0)}
    report["cudagraph_counters_after_warmup"] = {key: change for key, change in moved.items() if "cudagraph" in key}
    report["scale_0_is_the_base_bit_for_bit"] = swap_images[(("bench_a", 0.0),)] == swap_images[()]
    last_none, _ = run(())
    report["base_after_all_swaps_is_the_first_bit_for_bit"] = last_none.images[0].tobytes() == first_base
    if args.mode == "merge":
        report["host_backup_gb"] = round(engine.variants.merged.backup_bytes / 2**30, 2)
    report["steps"] = result.steps
    report["size"] = f"{side}x{side}"
    report["rows"] = _summarize(rows)
    report["variants"] = [row for row in engine.variants.report() if row["kind"] == "execution"]
    report["meta"] = environment_meta(engine)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.json").write_text(json.dumps(report, indent=2))
    (args.out / "lora.md").write_text(markdown(report))
    print(markdown(report))
    ok = report["new_graphs_after_warmup"] == 0 and report["scale_0_is_the_base_bit_for_bit"]
    ok = ok and report["base_after_all_swaps_is_the_first_bit_for_bit"]
    if not ok:
        print("FAILED: a swap compiled new graphs, or scale 0 or the last edit without adapters did not reproduce the base output")
    return 0 if ok else 1


def _make_and_load(engine, lora_dir: Path, rank: int, random_adapter, save_diffusers, block_targets) -> list[dict]:
    transformer = engine.loaded.pipe.transformer
    rows = []
    for seed, name in enumerate(("bench_a", "bench_b"), start=1):
        state, config = random_adapter(transformer, rank, seed=seed, targets=block_targets(transformer), gain=0.1)
        save_diffusers(lora_dir / f"{name}.safetensors", state, config)
        started = time.perf_counter()
        adapter = engine.loras.load(name)
        rows.append(
            {
                "name": name,
                "file_mb": round((lora_dir / f"{name}.safetensors").stat().st_size / 2**20, 1),
                "layers": len(adapter.weights.modules),
                "load_s": round(time.perf_counter() - started, 3),
                "device_mb": round(adapter.nbytes / 2**20, 1),
            }
        )
    return rows


def _summarize(rows: dict) -> dict:
    none = statistics.median(rows["none"]["step_s"])
    summary = {}
    for label, row in rows.items():
        step = statistics.median(row["step_s"])
        summary[label] = {
            "median_step_ms": round(step * 1e3, 2),
            "step_vs_none": round(step / none, 3) if none else None,
            "median_edit_s": round(statistics.median(row["edit_s"]), 3),
            "median_swap_ms": round(statistics.median(row["swap_ms"]), 2) if row["swap_ms"] else None,
            "median_restore_ms": round(statistics.median(row["restore_ms"]), 2) if row["restore_ms"] else None,
            "peak_gb": round(max(row["peak_gb"]), 2) if row["peak_gb"] else None,
        }
    return summary


def markdown(report: dict) -> str:
    lines = [
        f"# LoRA ({report['mode']} mode) on {report['meta']['device']}: {report['model']}, {report['size']}, {report['steps']} steps",
        "",
        f"Config: {report['config']}. Adapters: rank {report['adapter_rank']} on every attention and MLP Linear of the blocks; "
        + (
            f"{report['slots']} slots of rank {report['slot_rank']}."
            if report["mode"] == "slots"
            else f"merged into the weights (host copy of the base weights: {report.get('host_backup_gb')} GB)."
        ),
        "",
        "| adapters | median step ms | vs none | median edit s | swap ms | of which restore ms | peak GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in report["rows"].items():
        cells = [row["median_step_ms"], row["step_vs_none"], row["median_edit_s"], row["median_swap_ms"]]
        cells += [row.get("median_restore_ms"), row["peak_gb"]]
        lines.append(f"| {label} | " + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |")
    lines += ["", "| adapter | file MB | layers | load s | device MB |", "|---|---|---|---|---|"]
    for row in report["adapters"]:
        lines.append(f"| {row['name']} | {row['file_mb']} | {row['layers']} | {row['load_s']} | {row['device_mb']} |")
    lines += ["", "| execution variant | added MB | first edit s | uses |", "|---|---|---|---|"]
    for row in report["variants"]:
        key = ", ".join(f"{k}={v}" for k, v in row["key"].items() if k.startswith("lora")) or "without LoRA layers"
        lines.append(f"| {key} | {row['added_memory_mb']} | {row['first_edit_s']} | {row['uses']} |")
    lines += [
        "",
        f"- First edit per adapter set (compiles its variant): {report['first_edit_s']}",
        f"- New compiled graphs over {report['swaps']} swaps and the timed edits after warm-up: **{report['new_graphs_after_warmup']}** "
        f"(Dynamo's unique_graphs); CUDA-graph counters that moved: {report['cudagraph_counters_after_warmup'] or 'none'}",
        f"- Scale 0 reproduces the output without adapters bit for bit: **{report['scale_0_is_the_base_bit_for_bit']}**; "
        f"the last edit without adapters reproduces the first: **{report['base_after_all_swaps_is_the_first_bit_for_bit']}**",
        f"- torch {report['meta']['torch']}, CUDA {report['meta']['cuda']}, {report['meta']['date']}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
