"""Warm-up: every shape a request can reach runs once, so that requests at those shapes pay no
compile and no CUDA-graph recording.

A shape is an output size and whether an input image comes with it (an edit attends over the
reference image's tokens as well: 8192 + 512 tokens at 1024x1024, against 4096 + 512 for text to
image). Kontext snaps inputs to its 17 preferred resolutions, so a full-size model has 34 shapes:
the first one compiles (once, with dynamic sequence lengths: stages/compile.py), each later one
costs a two-step edit, in which Inductor's cudagraph trees warm up and record that shape.

The server warms the first shape before /ready and the others afterwards, one per idle moment of the
thread that serves requests (service/queue.py): cudagraph trees are per thread, so a shape recorded
on any other thread would be recorded again by the first request there. A shape a request ran first
is skipped (engine.py notes each variant's `shapes_run`). A shape a request ran without recording
its CUDA graphs (serve --defer-graph-recording) is not: the warm-up records it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from PIL import Image

from stages.config import OptimizationConfig

from .engine import WARMUP_STEPS, KontextEngine
from .requests import BuildInProgress, EditRequest, LoraChoice
from .sizes import KONTEXT_RESOLUTIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    edit: bool  # with an input image (Kontext's reference tokens) or text to image
    lora: str | None = None  # an adapter: the variant with LoRA slots is a variant of its own

    def label(self) -> str:
        return f"{self.width}x{self.height} {'edit' if self.edit else 'text-to-image'}" + (f" with LoRA {self.lora}" if self.lora else "")


@dataclass
class WarmupReport:
    # each shape with its seconds and what warmed it: "warm-up", or "request" (a request ran it first: 0 s here)
    shapes: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: first_shape_s (builds and compiles), other_shapes_s
    total_s: float = 0.0  # seconds spent warming (not the wall time from the first shape to the last)
    done_at: float | None = None  # epoch time when every shape was warm (the start-up benchmark subtracts its launch time)

    def as_dict(self) -> dict:
        return asdict(self)


def shapes_for(engine: KontextEngine) -> list[Shape]:
    """Every shape a request at a preferred resolution reaches: edits first (the heavier graphs)."""
    spec = engine.loaded.spec
    if spec.snap_input_to_kontext_resolutions:
        sizes = list(KONTEXT_RESOLUTIONS)
        square = min(sizes, key=lambda wh: abs(wh[0] - wh[1]))  # the default size first: its compile is the common one
        sizes.remove(square)
        sizes.insert(0, square)
    else:  # models without preferred resolutions (tiny) warm their default size
        side = int(spec.default_max_area**0.5)
        sizes = [(side, side)]
    shapes = [Shape(width, height, edit) for edit in (True, False) for width, height in sizes]
    # With adapters loaded at start (serve --preload-lora), requests that name one run the variant
    # with LoRA slots: it is compiled and recorded too, so the first such request does not pay for it.
    # In merge mode they run the same variant; one merge makes the host copies of the base weights.
    loaded = engine.loras.loaded()
    if loaded:
        with_lora = shapes[:1] if engine.loras.settings.merges else shapes
        shapes += [Shape(shape.width, shape.height, shape.edit, loaded[0].name) for shape in with_lora]
    return shapes


def warm_up(engine: KontextEngine, config: OptimizationConfig | None = None, shapes: list[Shape] | None = None) -> WarmupReport:
    """Every shape in turn (precompile, serve --warm-all-before-ready, tests)."""
    warmup = Warmup(engine, config, shapes)
    while warmup.warm_next():
        pass
    return warmup.report


class Warmup:
    """The shapes left to warm with one config, one `warm_next` at a time. Each runs a short edit
    with `config` (default: the engine's), never skipping a step through the first-block cache, so
    that every block of every shape runs and is recorded. `status` may be read from any thread."""

    def __init__(self, engine: KontextEngine, config: OptimizationConfig | None = None, shapes: list[Shape] | None = None):
        self.engine = engine
        self.config = (config or engine.default_config).with_changes(cache_threshold=0.0)
        self.pending: deque[Shape] = deque(shapes if shapes is not None else shapes_for(engine))
        self.current: Shape | None = None
        self.report = WarmupReport()
        self._lock = threading.Lock()  # pending, current and the report: /health reads them while the worker warms

    @property
    def done(self) -> bool:
        with self._lock:
            return not self.pending and self.current is None

    def warm_next(self) -> bool:
        """Warm the next shape no request has run yet, skipping (and reporting) those one has; False
        when nothing was left to warm, or when a variant build beside the serving thread keeps the
        shape from recording its CUDA graphs now (it stays pending: engine.records_cuda_graphs). A
        failing shape is reported, not raised (a request at it compiles it as before), except the
        first: nothing has shown yet that the variant runs."""
        while True:
            with self._lock:
                if not self.pending:
                    return False
                first = not self.report.shapes
                shape = self.current = self._take_next(first)
            request = _request(shape)
            row = {**asdict(shape), "seconds": 0.0, "by": "request"}
            started = time.perf_counter()
            try:
                if first or not self.ran(request):
                    row["by"] = "warm-up"
                    self.engine.edit(request, self.config, wait_for_build=first, warm_up=True)  # idle work never waits for a build
            except BuildInProgress:
                with self._lock:
                    self.pending.appendleft(shape)
                    self.current = None
                return False
            except Exception as error:
                if first:
                    with self._lock:
                        self.current = None
                    raise
                row["error"] = f"{type(error).__name__}: {error}"
                log.warning("warm-up %s failed (a request at this shape compiles it): %s", shape.label(), row["error"])
            if row["by"] == "warm-up":
                row["seconds"] = round(time.perf_counter() - started, 2)
            self._finish(shape, row, first)
            if row["by"] == "warm-up":
                return True

    def _take_next(self, first: bool) -> Shape:
        """Under the lock: the next pending shape, a shape a request ran without CUDA graphs first
        (engine.defer_graph_recording): a client that sent one request at a shape is likely to send
        more, and the next one would record it."""
        if not first and self.engine.defer_graph_recording:
            for shape in self.pending:
                if self._ran_without_graphs(_request(shape)):
                    self.pending.remove(shape)
                    return shape
        return self.pending.popleft()

    def _ran_without_graphs(self, request: EditRequest) -> bool:
        variant = self._variant_now(request)
        return variant is not None and self.engine.shape_of(request) in variant.shapes_deferred

    def ran(self, request: EditRequest) -> bool:
        """Whether the serving thread has run this shape in full on the variant it would run on now."""
        variant = self._variant_now(request)
        return variant is not None and self.engine.shape_of(request) in variant.shapes_run

    def _variant_now(self, request: EditRequest):
        """The built variant `request` would run on now with this warm-up's config, or None."""
        key, _ = self.engine.variant_for(request, self.config)
        return self.engine.variants.find(key)

    def _finish(self, shape: Shape, row: dict, first: bool) -> None:
        with self._lock:
            report = self.report
            report.shapes.append(row)
            report.total_s = round(report.total_s + row["seconds"], 2)
            self.current = None
            if first:
                report.phases["first_shape_s"] = row["seconds"]
                log.info("warm-up %s: %.1f s (builds and compiles the variant)", shape.label(), row["seconds"])
            elif row["by"] == "request":
                log.info("warm-up %s: skipped, a request ran it first", shape.label())
            else:
                log.debug("warm-up %s: %.2f s", shape.label(), row["seconds"])
            if not self.pending:
                report.done_at = round(time.time(), 3)
                if len(report.shapes) > 1:
                    report.phases["other_shapes_s"] = round(report.total_s - report.phases["first_shape_s"], 2)
                log.info("warm-up: %d shapes warm, %.1f s spent warming them", len(report.shapes), report.total_s)

    def status(self) -> dict:
        """Labels of the shapes warm (by the warm-up or by a request), failed, being warmed and pending."""
        with self._lock:
            return {
                "warmed": [_label(row) for row in self.report.shapes if "error" not in row],
                "failed": [_label(row) for row in self.report.shapes if "error" in row],
                "warming": self.current.label() if self.current else None,
                "pending": [shape.label() for shape in self.pending],
            }

    def as_dict(self) -> dict:
        with self._lock:
            return self.report.as_dict()


def record_aot_functions(engine: KontextEngine, config: OptimizationConfig | None = None):
    """After a warm-up: the compiled modules of `config`'s variant saved as ahead-of-time functions
    (stages/precompiled.py), recorded during one edit with an input image and one without at the
    first warm shape: together they call every compiled module with every input layout it sees.
    Sequence lengths are dynamic, so the other resolutions need no recording of their own."""
    from stages.compile import compiled_modules
    from stages.precompiled import record

    config = (config or engine.default_config).with_changes(cache_threshold=0.0)
    effective = engine.resolve(config).effective
    pipe, variant, _ = engine.variants.pipeline_for(effective)
    first = shapes_for(engine)[0]
    with record(compiled_modules(pipe, effective, engine.env)) as recording:
        warm_up(engine, config, [Shape(first.width, first.height, True), Shape(first.width, first.height, False)])
    return recording


def _request(shape: Shape) -> EditRequest:
    image = Image.new("RGB", (shape.width, shape.height), (120, 140, 160)) if shape.edit else None
    loras = (LoraChoice(shape.lora, 1.0),) if shape.lora else ()
    return EditRequest(prompt="warm-up", image=image, width=shape.width, height=shape.height, steps=WARMUP_STEPS, seed=0, loras=loras)


def _label(row: dict) -> str:
    return Shape(row["width"], row["height"], row["edit"], row["lora"]).label()
