"""Starting an engine before it takes traffic, the same in the in-process worker and in every worker
process of `serve --gpus`: load the model, load a compile-artifact bundle, then warm up every shape a
request can reach, so that no request after /ready pays a compile or a CUDA-graph recording; then
the same for each variant --warm-variants names, so that requests asking for one find it built."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from engine.compile_artifacts import bundle_key, compile_counters, default_bundle_path, describe, load_bundle, load_precompiled
from engine.compile_cache import active_cache_dir
from engine.warmup import warm_up

log = logging.getLogger("flux_kontext.service")


def start_engine(loader: Callable[[], object] | None, settings, engine=None, on_phase: Callable[[str], None] = lambda phase: None):
    """(engine, startup report): `engine` as given, or loaded by `loader`, then warmed when the settings ask."""
    startup: dict = {}
    if engine is None:
        started = time.perf_counter()
        engine = loader()
        startup["load_s"] = round(time.perf_counter() - started, 2)
        log.info("model loaded in %.1f s: %s", startup["load_s"], engine.model_info.get("name"))
    wanted = [json.loads(text) for text in settings.warm_variants]
    if wanted and len(wanted) + 1 > engine.variants.max_variants:  # the default variant stays resident too
        raise ValueError(
            f"--warm-variants names {len(wanted)} variant(s), but --max-variants {engine.variants.max_variants} keeps at most "
            f"{engine.variants.max_variants - 1} beside the default one: raise --max-variants or name fewer"
        )
    if settings.warmup or wanted:
        on_phase("warming")
        startup["compile_artifacts"] = load_compile_artifacts(engine, settings.compile_artifacts, settings.aot_functions)
    if settings.warmup:
        startup["warmup"] = warm_up(engine).as_dict()
    for overrides in wanted:  # built and warmed at every shape, as the default one
        report = warm_up(engine, engine.default_config.with_changes(**overrides))
        startup.setdefault("warm_variants", []).append({"optimizations": overrides, **report.as_dict()})
        log.info("warm variant %s: %d shapes in %.1f s", overrides, len(report.shapes), report.total_s)
    if settings.warmup or wanted:
        startup["compile_counters"] = compile_counters()  # cache hits, misses, bypasses: what the warm-ups compiled
    return engine, startup


def load_compile_artifacts(engine, path: str | None, aot_functions: bool = True) -> dict:
    """Before the first compile: the bundle at `path`, else the one `precompile` left in the compile
    cache directory for exactly this setup, if any; with `aot_functions`, its ahead-of-time
    functions too, which the default variant's build then runs instead of compiling."""
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
