"""The worker side of `serve --gpus`: one spawned process per GPU, with its own engine.

    front -> worker  ("job", id, kind, call, deadline) | ("cancel", id) | ("stop",)
    worker -> front  ("ready", info) | ("load_failed", message) | ("started", id)
                     | ("done", id, result, status) | ("failed", id, outcome, error, status) | ("skipped", id)

The process pins its GPU (CUDA_VISIBLE_DEVICES) before anything can initialise CUDA, loads and
warms its engine, says "ready", then runs the jobs it is sent one at a time. It acks "started"
before running a job, so that the front knows which jobs may be given to another worker if this
one dies (those it never started) and which may not (the one it was running). A reader thread
takes messages as they arrive, so a cancel for a buffered job is seen before that job starts. A
job past its deadline is skipped: its client has had its 504 already.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
import traceback
from typing import Any, Callable

log = logging.getLogger("flux_kontext.service.worker")

NOISY_LOGGERS = ("httpx", "urllib3", "PIL", "torch._dynamo", "torch._inductor", "transformers", "diffusers", "torchao")


def worker_main(index: int, gpu: str | None, loader: Callable[[str], Any], settings, inbox, outbox, cpu_threads: int | None) -> None:
    """Entry of a spawned worker process. `gpu` is the GPU id it owns (None: a CPU worker)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA is initialised: the worker sees its GPU as cuda:0
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    if gpu is None and cpu_threads:
        torch.set_num_threads(cpu_threads)  # CPU workers share the cores instead of each taking all
    try:
        started = time.perf_counter()
        engine = loader("cuda:0" if gpu is not None else "cpu")
        startup = {"load_s": round(time.perf_counter() - started, 2)}
        if settings.warmup:
            startup.update(_warm_up(engine, settings))
        outbox.send(("ready", {"pid": os.getpid(), **describe(engine), "startup": startup}))
    except BaseException as error:  # noqa: BLE001 - reported to the front, which does not restart a worker that cannot load
        log.error("worker %d could not load or warm up its engine", index, exc_info=error)
        outbox.send(("load_failed", f"{type(error).__name__}: {error}"))
        return
    _serve(engine, inbox, outbox)


def _warm_up(engine, settings) -> dict:
    """What Service does before /ready in one process: the compile-artifact bundle, then the warm-up."""
    from pathlib import Path

    from engine.compile_artifacts import bundle_key, default_bundle_path, load_bundle
    from engine.compile_artifacts import describe as describe_bundle
    from engine.compile_cache import active_cache_dir
    from engine.warmup import warm_up

    key = bundle_key(engine.env, engine.resolve().effective)
    path = settings.compile_artifacts
    if path is None and active_cache_dir() is not None:
        path = default_bundle_path(active_cache_dir(), key)
    outcome = load_bundle(Path(path) if path else None, key)
    log.info(describe_bundle(outcome))
    return {"compile_artifacts": outcome.as_dict(), "warmup": warm_up(engine).as_dict()}


def describe(engine) -> dict:
    """What the front needs to validate requests and answer /health without an engine of its own."""
    return {
        "model_info": engine.model_info,
        "spec": engine.loaded.spec,
        "default_config": engine.default_config,
        "environment": engine.env.summary(),
        "has_cuda": engine.env.has_cuda,
        "stages": engine.stage_status(),
        **status(engine),
    }


def status(engine) -> dict:
    """The parts of /health that change as the worker serves."""
    return {"memory": engine.memory(), "variants": engine.variants.report()}


def _serve(engine, inbox, outbox) -> None:
    from engine.engine import EditCancelled

    from .queue import GpuOutOfMemory, JobCancelled, JobRefused, is_out_of_memory, release_memory

    jobs: queue.Queue = queue.Queue()
    cancelled: set[int] = set()

    def read() -> None:
        """Take messages as they come, so that the front never blocks sending a job while one runs."""
        while True:
            try:
                message = inbox.recv()
            except (EOFError, OSError):  # the front is gone
                message = ("stop",)
            if message[0] == "stop":
                jobs.put(None)
                return
            if message[0] == "cancel":
                cancelled.add(message[1])
            else:
                jobs.put(message[1:])

    threading.Thread(target=read, name="worker-inbox", daemon=True).start()
    while True:
        item = jobs.get()
        if item is None:
            return
        job_id, kind, call, deadline = item
        if job_id in cancelled or time.monotonic() > deadline:
            cancelled.discard(job_id)
            outbox.send(("skipped", job_id))
            continue
        outbox.send(("started", job_id))
        out_of_memory = None
        try:
            result = call.run(engine)
        except EditCancelled as stopped:  # its deadline passed while it ran
            outbox.send(("failed", job_id, "cancelled_timeout", _portable(stopped), status(engine)))
        except JobCancelled as stopped:
            outbox.send(("failed", job_id, "cancelled_requested", _portable(stopped), status(engine)))
        except JobRefused as refused:  # a client error found here (an adapter this worker has not loaded): a 4xx, no traceback
            outbox.send(("failed", job_id, "refused", _portable(refused.reason), status(engine)))
        except BaseException as error:  # noqa: BLE001 - the worker survives anything a job does
            if is_out_of_memory(error):
                out_of_memory = (str(error).splitlines() or ["out of memory"])[0][:300]
            else:
                log.error("%s job failed", kind, exc_info=error)
                outbox.send(("failed", job_id, "failed", _portable(error), status(engine)))
        else:
            outbox.send(("done", job_id, result, status(engine)))
        if out_of_memory is not None:  # out of the except block: its traceback no longer pins the step's tensors
            release_memory()
            log.warning("%s job ran out of memory (%s); released cached memory, serving on", kind, out_of_memory)
            outbox.send(("failed", job_id, "out_of_memory", _portable(GpuOutOfMemory(out_of_memory)), status(engine)))


def _portable(error: BaseException) -> tuple[str, str, bytes | None]:
    """An exception as (type name, message, pickle or None): the front rebuilds it when it can."""
    try:
        blob = pickle.dumps(error)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt (custom __init__ signatures)
    except Exception:  # noqa: BLE001
        blob = None
    text = str(error) or "".join(traceback.format_exception_only(type(error), error)).strip()
    return type(error).__name__, text, blob
