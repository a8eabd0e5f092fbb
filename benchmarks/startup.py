"""Cold and warm starts, and the first request at a new resolution.

    python -m benchmarks.startup --model synthetic-full --preset 5 --label cold --cache-dir /tmp/cc --out DIR
    python -m benchmarks.startup --model synthetic-full --preset 5 --label warm --cache-dir /tmp/cc --out DIR

One process: load the model, run the first edits at 1024x1024 (compilation happens here), then at
two other Kontext resolutions. Run it once with an empty compile cache (cold) and again with the
same cache directory (warm: what a restarted server pays). Writes startup_<label>.json.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

RESOLUTIONS = [(1024, 1024), (1024, 1024), (1184, 880), (1184, 880), (832, 1248), (1024, 1024)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-full")
    parser.add_argument("--preset", type=int, default=5)
    parser.add_argument("--label", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from engine.compile_cache import configure_compile_cache

    cache_dir = configure_compile_cache(args.cache_dir)
    from engine.benchmark.runner import benchmark_input_image, environment_meta
    from engine.engine import KontextEngine
    from engine.requests import EditRequest
    from stages.config import cumulative_config

    imported = time.perf_counter() - PROCESS_START
    config = cumulative_config(args.preset).with_changes(first_block_cache=False)
    engine = KontextEngine.load(args.model, "cuda:0", config)
    loaded = time.perf_counter() - PROCESS_START
    rows = []
    for width, height in RESOLUTIONS:
        request = EditRequest(prompt="make the sky red", image=benchmark_input_image(width, height), width=width, height=height, seed=0)
        start = time.perf_counter()
        result = engine.edit(request)
        rows.append(
            {
                "width": width,
                "height": height,
                "edit_s": round(time.perf_counter() - start, 2),
                "median_step_ms": round(result.timings.median_step_s * 1e3, 2),
                "steps": result.steps,
            }
        )
        print(rows[-1], flush=True)
    report = {
        "label": args.label,
        "compile_cache_dir": str(cache_dir),
        "compile_cache_mb": round(sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / 2**20, 1),
        "config": config.model_dump(),
        "import_s": round(imported, 1),
        "model_ready_s": round(loaded, 1),
        "first_edit_done_s": round(loaded + rows[0]["edit_s"], 1),
        "edits": rows,
        "meta": environment_meta(engine),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"startup_{args.label}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("meta", "edits")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
