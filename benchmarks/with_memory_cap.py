"""Run the project's command line with the process capped to N GiB of GPU memory
(torch.cuda.set_per_process_memory_fraction), as a card of that size would cap it:

    python -m benchmarks.with_memory_cap --gib 22 -- benchmark --stages 5 --memory-budget 22 ...

`--memory-budget` alone only chooses the tier's knobs; under this cap an allocation beyond the budget
fails with an out-of-memory error instead of passing unnoticed on a larger GPU.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, required=True, help="GPU memory the process may allocate")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the arguments of flux_kontext_optimized.py")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("with_memory_cap: no CUDA device, nothing to cap")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.gib * 2**30 / total), 0)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    entry = Path(__file__).resolve().parent.parent / "flux_kontext_optimized.py"
    sys.argv = [str(entry), *command]
    runpy.run_path(str(entry), run_name="__main__")


if __name__ == "__main__":
    main()
