"""Run the project's command line with every thread's Python stack written to a file every N seconds:
where a run that never finishes spends its time (a compile that stalls, a loop that recompiles).

    python -m benchmarks.with_stack_dumps --every 30 --to stacks.txt -- benchmark --stages 5 ...
"""

from __future__ import annotations

import argparse
import faulthandler
import runpy
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=30.0, help="seconds between dumps")
    parser.add_argument("--to", type=Path, required=True, help="file the stacks are appended to")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the arguments of flux_kontext_optimized.py")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    stacks = args.to.open("a")
    faulthandler.dump_traceback_later(args.every, repeat=True, file=stacks)
    entry = Path(__file__).resolve().parent.parent / "flux_kontext_optimized.py"
    sys.argv = [str(entry), *command]
    runpy.run_path(str(entry), run_name="__main__")


if __name__ == "__main__":
    main()
