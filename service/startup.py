"""Starting an engine before it takes traffic, the same in the in-process worker and in every worker
process of `serve --gpus`: load the model, load a compile-artifact bundle, then warm the first shape
of the default variant and of each variant --warm-variants names (which builds and compiles it), so
that the engine serves from /ready on. The other shapes are left to `BackgroundWarmups`, which the
thread that serves requests runs one shape at a time while no request waits (cudagraph trees are per
thread: engine/warmup.py); with --warm-all-before-ready every shape is warmed before /ready.

Every phase is timed (`startup` in /health, and one log line at /ready) for benchmarks/startup.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("flux_kontext.service")

PAUSED_POLL_S = 0.5  # how often idle work looks again whether a build beside the serving thread is done


def start_engine(loader: Callable[[], object] | None, settings, engine=None, on_phase: Callable[[str], None] = lambda phase: None):
    """(engine, startup report, BackgroundWarmups): `engine` as given, or loaded by `loader`, then
    warmed as the settings ask."""
    began = time.time()
    started_at = process_started_at()
    startup: dict = {"imports_s": round(began - started_at, 2) if started_at else None}  # everything before this call
    startup["engine_imports_s"] = _timed(_import_engine)  # torch, diffusers: 0 when something imported them before
    if settings.background_builds:  # before anything is compiled: compiled functions bind the patched check when wrapped
        from patches.compile_beside_serving import install

        log.info("variant builds beside the serving thread: %s", install())
    from engine.compile_artifacts import compile_counters
    from engine.warmup import Warmup

    if engine is None:
        started = time.perf_counter()
        engine = loader()
        startup["load_s"] = round(time.perf_counter() - started, 2)
        log.info("model loaded in %.1f s: %s", startup["load_s"], engine.model_info.get("name"))
    if settings.defer_graph_recording:
        from patches.cudagraph_trees_bypass import install as install_bypass

        log.info("CUDA graphs of a shape not recorded yet: deferred to the idle warm-up or its second request; %s", install_bypass())
        engine.defer_graph_recording = True
    wanted = [json.loads(text) for text in settings.warm_variants]
    if wanted and len(wanted) + 1 > engine.variants.max_variants:  # the default variant stays resident too
        raise ValueError(
            f"--warm-variants names {len(wanted)} variant(s), but --max-variants {engine.variants.max_variants} keeps at most "
            f"{engine.variants.max_variants - 1} beside the default one: raise --max-variants or name fewer"
        )
    warmups = [(None, Warmup(engine))] if settings.warmup else []
    warmups += [(overrides, Warmup(engine, engine.default_config.with_changes(**overrides))) for overrides in wanted]
    engine.variants.defer_residency = True  # replaced weights go to host memory after /ready, when idle (engine/variants.py)
    background = BackgroundWarmups(warmups, residency=engine.variants, recording_paused=lambda: engine.building)
    if warmups:
        on_phase("warming")
        started = time.perf_counter()
        startup["compile_artifacts"] = load_compile_artifacts(engine, settings.compile_artifacts, settings.aot_functions)
        startup["compile_artifacts_s"] = round(time.perf_counter() - started, 2)
    for _overrides, warmup in warmups:  # the first shape builds and compiles each variant
        warmup.warm_next()
        while settings.warm_all_before_ready and warmup.warm_next():
            pass
    if warmups:
        startup["compile_counters"] = compile_counters()  # cache hits, misses, bypasses: what the warm-ups compiled
    startup.update(background.report())
    startup["ready_at"] = round(time.time(), 3)
    startup["ready_after_process_start_s"] = round(startup["ready_at"] - started_at, 2) if started_at else None
    log.info("start-up: %s", _summary(startup, background))
    return engine, startup, background


class BackgroundWarmups:
    """The work left after /ready, for the serving thread to do one piece at a time once no request
    has come for a moment (service/queue.py, service/worker_process.py): the warm-ups' shapes, one
    each, then the replaced base weights' move to host memory, a slice at a time (`residency`: the
    engine's VariantCache, whose builds defer that move). `report` and `status` may be read from any
    thread."""

    def __init__(self, warmups: list, residency=None, recording_paused: Callable[[], bool] = lambda: False):
        self.warmups = warmups  # (the --warm-variants overrides or None for the default variant, Warmup)
        self.residency = residency  # .residency_pending, and .settle_some() moves one slice
        # true while a variant is built beside the serving thread: a shape's warm-up records CUDA
        # graphs, which must not overlap a build (engine.records_cuda_graphs), so it waits
        self.recording_paused = recording_paused
        self._settle_failed = False
        self._logged = threading.Event()

    @property
    def pending(self) -> bool:
        """Shapes left to warm."""
        return any(not warmup.done for _, warmup in self.warmups)

    @property
    def settling(self) -> bool:
        """Replaced base weights left on the GPU by a build, to move when idle (any build may leave some)."""
        return self.residency is not None and self.residency.residency_pending and not self._settle_failed

    @property
    def idle_work_pending(self) -> bool:
        return self.pending or self.settling

    def wait_s(self, last_job_end: float, quiet_s: float) -> float | None:
        """Seconds before the next piece of idle work may start (0: now): `quiet_s` after the last job
        ended (time.monotonic()), so that a client's back-to-back requests never wait for one; None
        when nothing is left."""
        if not self.idle_work_pending:
            return None
        wait = max(0.0, last_job_end + quiet_s - time.monotonic())
        if self.pending and not self.settling and self.recording_paused():
            return max(wait, PAUSED_POLL_S)
        return wait

    def do_one(self) -> None:
        """One piece of idle work: a shape while any is left (requests gain from those), else a slice
        of the move to host memory (which only frees memory the GPU had room for)."""
        if self.pending and not self.recording_paused():
            self.warm_one()
            return
        if not self.settling:
            return
        try:
            self.residency.settle_some()
        except Exception:  # noqa: BLE001 - the weights stay on the GPU: memory, not correctness
            log.exception("moving replaced base weights to host memory failed; they stay on the GPU")
            self._settle_failed = True

    def warm_one(self) -> None:
        """Warm the next pending shape (one edit at most); logs once when every shape is warm."""
        for _, warmup in self.warmups:
            if not warmup.done:
                warmup.warm_next()
                break
        if not self.pending and self.warmups and not self._logged.is_set():
            self._logged.set()
            done_at = max(warmup.report.done_at or 0 for _, warmup in self.warmups)
            started_at = process_started_at()
            after = f" ({done_at - started_at:.1f} s after the process started)" if started_at else ""
            log.info("every shape is warm%s: %s", after, self._counts())

    def report(self) -> dict:
        """What /health's `startup` says of the warm-ups: each one's shapes and seconds, as they go."""
        found: dict = {}
        for overrides, warmup in self.warmups:
            if overrides is None:
                found["warmup"] = warmup.as_dict()
            else:
                found.setdefault("warm_variants", []).append({"optimizations": overrides, **warmup.as_dict()})
        return found

    def status(self) -> dict:
        """Shapes warmed, being warmed and pending, over every warm-up (a warm variant's labels name it)."""
        merged = {"done": not self.pending, "warmed": [], "failed": [], "warming": None, "pending": []}
        for overrides, warmup in self.warmups:
            prefix = f"{json.dumps(overrides, sort_keys=True)} " if overrides is not None else ""
            status = warmup.status()
            for key in ("warmed", "failed", "pending"):
                merged[key] += [prefix + label for label in status[key]]
            if status["warming"]:
                merged["warming"] = prefix + status["warming"]
        return merged

    def _counts(self) -> str:
        status = self.status()
        return f"{len(status['warmed'])} warm, {len(status['failed'])} failed, {len(status['pending'])} pending"


def load_compile_artifacts(engine, path: str | None, aot_functions: bool = True) -> dict:
    """Before the first compile: the bundle at `path`, else the one `precompile` left in the compile
    cache directory for exactly this setup, if any; with `aot_functions`, its ahead-of-time
    functions too, which the default variant's build then runs instead of compiling."""
    from engine.compile_artifacts import bundle_key, default_bundle_path, describe, load_bundle, load_precompiled
    from engine.compile_cache import active_cache_dir

    key = bundle_key(engine.env, engine.resolve().effective)
    asked = path is not None
    if path is None and active_cache_dir() is not None:
        path = default_bundle_path(active_cache_dir(), key)
    outcome = load_bundle(Path(path) if path else None, key)
    # The default place is empty on every start without `precompile` (and always with compile off):
    # worth a line only when a bundle was asked for or found there.
    found = path is not None and Path(path).is_file()
    log.log(logging.INFO if asked or found else logging.DEBUG, describe(outcome))
    report = outcome.as_dict()
    if outcome.loaded and outcome.aot_units and aot_functions:
        engine.variants.precompiled, report["aot_functions"] = load_precompiled(outcome, key)
        log.info("compile artifacts: %s", report["aot_functions"])
    return report


def process_started_at() -> float | None:
    """Epoch time this process started (Linux: /proc), so that start-up reports include the
    interpreter's start and every import; None where /proc does not say."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _import_engine() -> None:
    """The engine's own imports (torch, diffusers, transformers): the bulk of a start's import time."""
    if "engine.engine" not in sys.modules:
        import engine.engine  # noqa: F401


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return round(time.perf_counter() - started, 2)


def _summary(startup: dict, background: BackgroundWarmups) -> str:
    phases = (
        ("imports", startup.get("imports_s")),
        ("engine imports", startup.get("engine_imports_s")),
        ("model load", startup.get("load_s")),
        ("bundle load", startup.get("compile_artifacts_s")),
        ("first shape", startup.get("warmup", {}).get("phases", {}).get("first_shape_s")),
    )
    text = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases if seconds is not None)
    ready = startup.get("ready_after_process_start_s")
    text += f"; ready {ready:.1f} s after the process started" if ready is not None else "; ready"
    pending = len(background.status()["pending"])
    return text + (f"; {pending} shape(s) left to warm while idle" if pending else "")
