"""Where loading a bundle's ahead-of-time functions spends its time (issue 24: 12.3 s of a 38.6 s
start on an H100, 2026-12-06, against 0.7 s for the same bundle's caches without them).

    python -m benchmarks.profile_aot_load --bundle BUNDLE --model synthetic-full --out DIR

Loads the engine as `serve` does, on an empty compile cache of its own (a fresh node), then runs the
bundle's load under cProfile in this thread, the way service/startup.py runs it before the first
shape. Writes aot_load_profile.txt: the load's report, then the functions by cumulative and by own
time. A lab script: it times one load, with the profiler's overhead on top.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a bundle that `precompile --aot-compile` wrote")
    parser.add_argument("--model", default="synthetic-full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top", type=int, default=40, help="functions listed per ordering")
    parser.add_argument("--optimizations", default="{}", help="JSON, as precompile had them, e.g. '{\"compile\": true}' on a CPU")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from cli.engine_loader import EngineOptions, load_engine
    from service.startup import load_compile_artifacts

    cache = tempfile.mkdtemp(prefix="aot-load-cache-")
    engine = load_engine(EngineOptions(model=args.model, compile_cache=cache, optimizations=json.loads(args.optimizations)))
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    report = load_compile_artifacts(engine, args.bundle)
    profiler.disable()
    seconds = time.perf_counter() - started

    text = io.StringIO()
    text.write(f"bundle load under cProfile: {seconds:.2f} s\n{json.dumps(report, indent=2, default=str)}\n")
    for order in ("cumulative", "tottime"):
        text.write(f"\n=== by {order} time\n")
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
    (args.out / "aot_load_profile.txt").write_text(text.getvalue())
    print(f"bundle load under cProfile: {seconds:.2f} s; {args.out / 'aot_load_profile.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
