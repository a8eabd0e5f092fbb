"""Warm-up: every shape a request can reach runs once before traffic, so that no request pays a
compile or a CUDA-graph recording.

A shape is an output size and whether an input image comes with it (an edit attends over the
reference image's tokens as well: 8192 + 512 tokens at 1024x1024, against 4096 + 512 for text to
image). Kontext snaps inputs to its 17 preferred resolutions, so a full-size model has 34 shapes:
the first one compiles (once, with dynamic sequence lengths: stages/compile.py), each later one
costs a two-step edit, in which Inductor's cudagraph trees warm up and record that shape.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from PIL import Image

from stages.config import OptimizationConfig

from .engine import WARMUP_STEPS, KontextEngine
from .requests import EditRequest, LoraChoice
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
    shapes: list[dict] = field(default_factory=list)  # each warmed shape with its seconds
    phases: dict[str, float] = field(default_factory=dict)  # seconds: first_shape (builds and compiles), other_shapes
    total_s: float = 0.0

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
    """Run a short edit at every shape with `config` (default: the engine's), never skipping a step
    through the first-block cache, so that every block of every shape runs and is recorded."""
    config = (config or engine.default_config).with_changes(cache_threshold=0.0)
    shapes = shapes if shapes is not None else shapes_for(engine)
    report = WarmupReport()
    started = time.perf_counter()
    for index, shape in enumerate(shapes):
        shape_started = time.perf_counter()
        image = Image.new("RGB", (shape.width, shape.height), (120, 140, 160)) if shape.edit else None
        loras = (LoraChoice(shape.lora, 1.0),) if shape.lora else ()
        request = EditRequest(
            prompt="warm-up", image=image, width=shape.width, height=shape.height, steps=WARMUP_STEPS, seed=0, loras=loras
        )
        engine.edit(request, config)
        seconds = time.perf_counter() - shape_started
        report.shapes.append({**asdict(shape), "seconds": round(seconds, 2)})
        if index == 0:
            report.phases["first_shape_s"] = round(seconds, 2)
            log.info("warm-up %s: %.1f s (builds and compiles the variant)", shape.label(), seconds)
        else:
            log.debug("warm-up %s: %.2f s", shape.label(), seconds)
    report.total_s = round(time.perf_counter() - started, 2)
    if len(shapes) > 1:
        report.phases["other_shapes_s"] = round(report.total_s - report.phases["first_shape_s"], 2)
    log.info("warm-up: %d shapes in %.1f s", len(shapes), report.total_s)
    return report


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
