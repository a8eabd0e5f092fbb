"""Run the project's command line with every thread's Python stack written to a file every N seconds:
where a run that never finishes spends its time (a compile that stalls, a loop that recompiles).

    python -m benchmarks.with_stack_dumps --every 30 --to stacks.txt -- benchmark --stages 5 ...

The stacks are taken by a Python thread (sys._current_frames), not by faulthandler's watchdog:
faulthandler walks the frames from a signal-free C thread while Dynamo's frame evaluation is
running, and on torch 2.11 / Python 3.12 that crashed the process (SIGSEGV) at its first dump.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import threading
import time
import traceback
from pathlib import Path


def _dump_stacks_every(seconds: float, path: Path) -> None:
    started = time.monotonic()
    while True:
        time.sleep(seconds)
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        lines = [f"=== {time.monotonic() - started:.0f} s\n"]
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            lines.append(f"--- thread {names.get(ident, ident)}\n")
            lines.extend(traceback.format_stack(frame))
        with path.open("a") as stacks:
            stacks.writelines(lines)


def start_stack_dumps(seconds: float, path: Path) -> threading.Thread:
    """Append every other thread's stack to `path` every `seconds`, from a daemon thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dumper = threading.Thread(target=_dump_stacks_every, args=(seconds, path), name="stack-dumps", daemon=True)
    dumper.start()
    return dumper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=30.0, help="seconds between dumps")
    parser.add_argument("--to", type=Path, required=True, help="file the stacks are appended to")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the arguments of flux_kontext_optimized.py")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start_stack_dumps(args.every, args.to)
    entry = Path(__file__).resolve().parent.parent / "flux_kontext_optimized.py"
    sys.argv = [str(entry), *command]
    runpy.run_path(str(entry), run_name="__main__")


if __name__ == "__main__":
    main()
