"""Scale-out launches of `serve`: which GPUs `serve --gpus` runs a worker process on, and a
context-parallel server under torchrun (rank 0 serves HTTP, the other ranks follow its edits)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

log = logging.getLogger("flux_kontext")


def worker_gpus(text: str, device: str | None) -> list[str | None]:
    """`serve --gpus` -> one entry per worker process: a GPU id, or None for a CPU worker (--device cpu).

    The GPUs are counted without creating a CUDA context here: the workers are spawned, and each
    creates its own on its own GPU."""
    cpu = device is not None and device.startswith("cpu")
    if device is not None and not cpu:
        raise ValueError(f"--gpus picks the GPUs itself; leave out --device {device} (or give --device cpu for CPU workers)")
    text = text.strip().lower()
    if text == "all":
        if cpu:
            raise ValueError("--gpus all --device cpu: say how many CPU worker processes, e.g. --gpus 0,1 --device cpu")
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("--gpus all: torch sees no CUDA GPU here; for CPU worker processes give --gpus 0,1 --device cpu")
        ids = [str(index) for index in range(count)]
    else:
        ids = [part.strip() for part in text.split(",") if part.strip()]
        if not ids or not all(part.isdigit() for part in ids):
            raise ValueError(f"--gpus {text!r}: write all, or GPU ids such as 0,1,3")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--gpus {text!r} names a GPU twice; one worker process per GPU")
        if not cpu:
            import torch

            count = torch.cuda.device_count()
            missing = [gpu for gpu in ids if int(gpu) >= count]
            if missing:
                raise ValueError(f"--gpus {text}: GPU(s) {', '.join(missing)} not found; torch sees {count} CUDA GPU(s)")
    return [None if cpu else gpu for gpu in ids]


def serve_context_parallel(args: argparse.Namespace, settings, options) -> int:
    """`torchrun --nproc_per_node=N flux_kontext_optimized.py serve --context-parallel N`."""
    from engine.context_parallel import ContextParallelEngine, init_process_group
    from service.app import create_app
    from service.server import serve

    from .engine_loader import load_engine

    if args.gpus:
        raise ValueError("--gpus and --context-parallel are two different launches: a worker per GPU, or one edit over all of them")
    if "RANK" not in os.environ:
        ranks = args.context_parallel
        raise ValueError(
            "--context-parallel needs one process per GPU, started by torchrun: "
            f".venv/bin/torchrun --nproc_per_node={ranks} flux_kontext_optimized.py serve --context-parallel {ranks}"
        )
    rank, world, device = init_process_group()
    if (args.context_parallel or 1) != world:
        raise ValueError(f"--context-parallel {args.context_parallel} under a torchrun launch of {world} processes: give the same number")
    options = options.on(device)
    if rank != 0:  # the followers: no HTTP, the same edits as rank 0
        # torchrun passes SIGTERM to every rank: followers keep going until rank 0 has drained and releases them
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        load_engine(options, engine_class=ContextParallelEngine).follow()
        return 0
    log.info("context parallelism over %d ranks; rank 0 serves HTTP on %s:%d", world, settings.host, settings.port)
    app = create_app(settings=settings, loader=lambda: load_engine(options, engine_class=ContextParallelEngine))
    try:
        status = serve(app, settings.host, settings.port, log_level="debug" if args.verbose else "info")
    finally:
        engine = getattr(app.state.service.worker, "engine", None)  # None when the load failed
        if engine is not None:
            engine.release_followers()
    if status:
        print(f"error: {app.state.service.error}", file=sys.stderr)
    return status
