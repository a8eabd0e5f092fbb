#!/usr/bin/env python3
"""FLUX.1-Kontext image editing, fast: the command line.

python flux_kontext_optimized.py serve       # HTTP service on 127.0.0.1:8000
python flux_kontext_optimized.py edit --image in.png --prompt "make the sky red" --out out.png
python flux_kontext_optimized.py benchmark   # stage-by-stage speed table under benchmarks/results/
python flux_kontext_optimized.py doctor      # torch/CUDA/GPU, packages, every stage's availability
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from cli.options import build_parser


def quiet_libraries(verbose: bool) -> None:
    """Library chatter that is not the user's concern: transformers' notes about optional packages,
    diffusers' empty "should be kept in float32" list, compile logs. --verbose brings them back."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for noisy in ("httpx", "urllib3", "PIL", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers' and torchao's notes about optional packages and kernels this machine does not
    # have, torch's deprecation notes on torchao's types: nothing a user can act on
    for noisy in ("transformers", "diffusers", "torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    from cli.commands import HANDLERS
    from engine.model_specs import ModelLoadError  # torch-free: a command imports what it uses

    try:
        return HANDLERS[args.command](args)
    except (ModelLoadError, ValueError, OSError) as error:  # user-fixable: bad option, path or model
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
