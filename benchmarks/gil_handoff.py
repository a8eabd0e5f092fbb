"""How long a thread that makes torch calls waits for the GIL beside a thread that runs Python, by
CPython's switch interval (why engine/serving_priority.py shortens it while a build runs beside the
serving thread).

    python -m benchmarks.gil_handoff --out benchmarks/results/gil-handoff

The "serving" thread makes `--calls` small torch calls (each releases the GIL and takes it back, as
a CUDA-graph replay does); a second thread runs pure Python, as Dynamo's tracing does. For each
interval: the calls' time beside the busy thread against alone, and how much of its speed alone the
busy thread keeps. Medians of `--repeats`. Writes gil_handoff.json and gil_handoff.md. A lab script:
no GPU, and the numbers depend on the machine's cores and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

INTERVALS_S = (5e-3, 1e-3, 5e-4, 2e-4, 1e-4)


def _calls(tensor, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        tensor.add_(1)
    return time.perf_counter() - started


class BusyThread:
    """Pure Python in a loop, counting its rounds, until stopped."""

    def __init__(self):
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sum(i * i for i in range(1000))
            self.rounds += 1

    def __enter__(self):
        self._thread.start()
        time.sleep(0.05)  # running before the measurement starts
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def busy_rate(seconds: float = 0.5) -> float:
    with BusyThread() as busy:
        started, rounds = time.perf_counter(), busy.rounds
        time.sleep(seconds)
        return (busy.rounds - rounds) / (time.perf_counter() - started)


def measure(calls: int, repeats: int) -> dict:
    import torch

    tensor = torch.zeros(16)
    previous = sys.getswitchinterval()
    alone_s = statistics.median(_calls(tensor, calls) for _ in range(repeats))
    rate_alone = busy_rate()
    rows = []
    try:
        for interval in INTERVALS_S:
            sys.setswitchinterval(interval)
            with BusyThread() as busy:
                started, rounds = time.perf_counter(), busy.rounds
                beside = [_calls(tensor, calls) for _ in range(repeats)]
                rate = (busy.rounds - rounds) / (time.perf_counter() - started)
            beside_s = statistics.median(beside)
            rows.append(
                {
                    "interval_ms": interval * 1e3,
                    "calls_beside_ms": round(beside_s * 1e3, 2),
                    "per_call_wait_ms": round((beside_s - alone_s) / calls * 1e3, 4),
                    "beside_over_alone": round(beside_s / alone_s, 1),
                    "busy_thread_speed_kept": round(rate / rate_alone, 2),
                }
            )
    finally:
        sys.setswitchinterval(previous)
    return {"calls": calls, "repeats": repeats, "calls_alone_ms": round(alone_s * 1e3, 3), "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"# GIL hand-off by switch interval ({result['machine']}, {result['date']}, Python {result['python']}, torch {result['torch']})",
        "",
        f"{result['calls']} torch calls on one thread: {result['calls_alone_ms']} ms alone (median of {result['repeats']}).",
        "",
        "| switch interval, ms | calls beside a Python-busy thread, ms | wait per call, ms | beside / alone | busy thread's speed kept |",
        "|---|---|---|---|---|",
    ]
    columns = ("calls_beside_ms", "per_call_wait_ms", "beside_over_alone", "busy_thread_speed_kept")
    lines += [f"| {row['interval_ms']:g} | " + " | ".join(str(row[column]) for column in columns) + " |" for row in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=800, help="about one 14-step edit's block calls (57 blocks x 14)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    result = measure(args.calls, args.repeats)
    result.update(
        machine=f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        python=platform.python_version(),
        torch=torch.__version__,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gil_handoff.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gil_handoff.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
