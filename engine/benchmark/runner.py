"""The stage-by-stage benchmark: cumulative presets in one process, through the engine's own edit path,
shared by `flux_kontext_optimized.py benchmark` and `GET /benchmark`.

For each preset: untimed warm-up edits (compilation happens there and is reported as warm-up time),
then timed edits whose text-encode, VAE-encode, per-step, denoise, VAE-decode and end-to-end times
are reported as medians, with peak GPU memory, speed-ups and the output's distance from stage 0.
Which rows run is chosen by `BenchmarkSettings.rows`: the main presets, the first-block-cache rows
and the option rows, so that a quick run fits a short GPU lease.
"""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from stages.config import KNOBS, MAX_PRESET, OptimizationConfig, cumulative_config
from stages.environment import package_version
from stages.registry import preset_title
from stages.rules import row_wise_fp8_weights

from ..requests import EditRequest, EditResult
from .report import BenchmarkReport, CacheResult, OptionResult, StageResult, deviation

if TYPE_CHECKING:  # the service imports BenchmarkSettings from here without the engine's diffusers
    from ..engine import KontextEngine

ROW_KINDS = ("main", "cache", "options")

# Options measured on top of the last preset that ran, each one knob away from it, reported with
# their speed and their deviation. Each row is a variant of its own (one more compile).
DEFAULT_OPTIONS: tuple[tuple[str, dict], ...] = (
    # the fused kernels' own contribution (in preset 3): the same stack with Inductor doing the glue
    ("without fused_kernels", {"fused_kernels": False}),
    # the MLP epilogue (an option until it has been measured): GELU -> FP8 in the fc1 GEMM's epilogue
    ("with mlp_epilogue", {"mlp_epilogue": True}),
    # FP8 attention's own contribution and deviation (it is in preset 3; bf16 FA3 is the alternative)
    ("bf16 attention (fa3)", {"attention": "fa3"}),
    # an exact lever switched back off: what dropping the reference tokens before the output GEMM buys
    ("without trim_reference_tokens", {"trim_reference_tokens": False}),
    # an option off in every preset (measured no faster on an H100): kept measurable
    ("with split_proj_out", {"split_proj_out": True}),
    # what holding the time embedding and RoPE tables at static addresses buys (in preset 5)
    ("graph inputs copied", {"graph_inputs": "copied"}),
)


@dataclass
class BenchmarkSettings:
    stages: list[int] = field(default_factory=lambda: list(range(MAX_PRESET + 1)))
    width: int | None = None  # default: the model's pixel budget (1024x1024 full, 256x256 tiny)
    height: int | None = None
    repeats: int = 3
    warmup: int = 1
    with_input_image: bool = True
    prompt: str = "make the sky red"
    seed: int = 0
    steps: int | None = None  # None: each preset's scheduler default (28 Euler, 14 DPM-Solver++)
    overrides: dict = field(default_factory=dict)  # applied on top of every preset's config
    rows: tuple[str, ...] = ROW_KINDS  # which kinds of rows run (see ROW_KINDS)
    # The main rows run with the first-block cache off: its skip rate on random weights says nothing
    # about real images, so its cost and skip rate are reported in rows of their own. Both backends
    # are measured so that `auto` rests on a comparison; an explicit cache_backend override narrows
    # the rows to that one.
    cache_backends: list[str] = field(default_factory=lambda: ["para_attn", "diffusers"])
    options: list = field(default_factory=lambda: list(DEFAULT_OPTIONS))
    roofline: bool = True  # GPU only: FLOPs per step, kernel ceilings measured in this run, floor
    profile: bool = False  # GPU only: kernel-class breakdown of each main row's step


def select_options(text: str | None) -> list:
    """The DEFAULT_OPTIONS rows named in `text` (labels, comma-separated; None: all)."""
    if text is None:
        return list(DEFAULT_OPTIONS)
    known = dict(DEFAULT_OPTIONS)
    labels = [label.strip() for label in text.split(",") if label.strip()]
    unknown = [label for label in labels if label not in known]
    if unknown or not labels:
        raise ValueError(f"option rows {text!r}: choose from {'; '.join(known)} (comma-separated)")
    return [(label, known[label]) for label in labels]


def parse_row_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in ROW_KINDS]
    if unknown or not kinds:
        raise ValueError(f"rows {text!r}: choose from {', '.join(ROW_KINDS)} (comma-separated)")
    return kinds


def benchmark_input_image(width: int, height: int) -> Image.Image:
    """A deterministic picture with edges, gradients and flat areas (a 'sky' to make red)."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = np.concatenate([0.3 + 0.5 * y * np.ones_like(x), 0.5 + 0.3 * x * np.ones_like(y), 0.9 - 0.4 * y * np.ones_like(x)], axis=2)
    image = Image.fromarray((pixels * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, height), (width * 0.35, height * 0.45), (width * 0.7, height)], fill=(70, 90, 60))
    draw.ellipse([width * 0.65, height * 0.1, width * 0.85, height * 0.3], fill=(250, 220, 120))
    return image


def environment_meta(engine: KontextEngine) -> dict:
    env = engine.env
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": env.gpu.name if env.gpu else "cpu",
        "dtype": str(engine.loaded.dtype).replace("torch.", ""),
        "torch": env.torch_version,
        "cuda": env.torch_cuda,
        **{
            name: package_version(dist)
            for name, dist in (
                ("diffusers", "diffusers"),
                ("transformers", "transformers"),
                ("torchao", "torchao"),
                ("fa3_fwd", "fa3-fwd"),
                ("para_attn", "para-attn"),
            )
        },
        "model": engine.loaded.spec.name,
        "random_weights": engine.loaded.spec.random_weights,
    }


class StageFailed(Exception):
    """An edit of one preset failed on this machine; the benchmark records it and goes on."""


@dataclass
class _Run:
    """One benchmark in progress: the engine, the request, progress reporting."""

    engine: KontextEngine
    request: EditRequest
    settings: BenchmarkSettings
    tick: Callable[[str], None]

    @property
    def cuda(self) -> bool:
        return self.engine.env.has_cuda

    def edits(self, config: OptimizationConfig, label: str) -> tuple[list[EditResult], list[EditResult]]:
        """(warm-up results, timed results); StageFailed when an edit raises."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        results = []
        for attempt in range(self.settings.warmup + max(self.settings.repeats, 1)):
            try:
                results.append(self.engine.edit(self.request, config))
            except Exception as error:
                raise StageFailed(f"{type(error).__name__}: {error}") from error
            self.tick(f"{label} edit {attempt + 1}")  # outside the try: a progress callback may stop the run
        return results[: self.settings.warmup], results[self.settings.warmup :]


def run_benchmark(
    engine: KontextEngine,
    settings: BenchmarkSettings,
    show_progress: bool = False,
    on_progress: Callable[[str, float], None] | None = None,
) -> BenchmarkReport:
    from tqdm.auto import tqdm

    side = int(engine.loaded.spec.default_max_area**0.5)
    width, height = settings.width or side, settings.height or side
    image = benchmark_input_image(width, height) if settings.with_input_image else None
    request = EditRequest(prompt=settings.prompt, image=image, width=width, height=height, seed=settings.seed, steps=settings.steps)
    cache_rows = 2 * len(_cache_backends(settings)) if "cache" in settings.rows else 0
    option_rows = len(settings.options) if "options" in settings.rows else 0
    main_rows = len(settings.stages) if "main" in settings.rows else 1  # without main rows, one preset is still the base
    total = (settings.warmup + max(settings.repeats, 1)) * (main_rows + cache_rows + option_rows)
    bar = tqdm(total=total, desc="benchmark", disable=not show_progress)
    done = [0]

    def tick(label: str) -> None:
        done[0] += 1
        bar.set_postfix_str(label)
        bar.update()
        if on_progress:
            on_progress(label, min(done[0] / total, 1.0))

    run = _Run(engine, request, settings, tick)
    meta = environment_meta(engine)
    meta.update(width=width, height=height, input_image=settings.with_input_image, repeats=settings.repeats, warmup=settings.warmup)
    flops = ceilings = None
    if run.cuda and settings.roofline:
        from .roofline import count_step_flops, measure_ceilings, measure_copy_bandwidth

        flops = count_step_flops(engine, request)
        ceilings = measure_ceilings(flops.attention_shape)
        meta["copy_bandwidth_gbps"] = measure_copy_bandwidth()
        meta.update(
            step_flops={k: (round(v / 1e12, 2) if isinstance(v, float) else v) for k, v in flops.as_dict().items()},
            ceilings_tflops=ceilings,
        )
    inputs = None
    if run.cuda and settings.profile:
        from .kernels import capture_transformer_inputs

        inputs = capture_transformer_inputs(engine, request)

    report = BenchmarkReport(meta, [])
    presets = settings.stages if "main" in settings.rows else settings.stages[-1:]
    reference: np.ndarray | None = None
    base: tuple[int, OptimizationConfig, StageResult, np.ndarray] | None = None
    for stage in presets:
        config = cumulative_config(stage).with_changes(**{"first_block_cache": False, **settings.overrides})
        try:
            warm, timed = run.edits(config, f"stage {stage}")
        except StageFailed as error:  # a preset that cannot run here must not hide the others' results
            report.rows.append(_failed_row(stage, error))
            continue
        row = _stage_row(stage, warm, timed, run.cuda)
        pixels = np.asarray(timed[-1].images[0], dtype=np.float64) / 255.0
        reference = pixels if reference is None else reference
        row.deviation_rel_l2, row.psnr_db = deviation(pixels, reference)
        if flops and ceilings:
            from .roofline import floor_ms

            row.floor_ms_per_step = floor_ms(flops, ceilings, timed[-1].config)
            if row.floor_ms_per_step:
                row.roofline_ratio = row.median_step_s * 1e3 / row.floor_ms_per_step
        if inputs is not None:
            from .kernels import glue_bandwidth, step_breakdown

            ran = timed[-1].config
            profiled = step_breakdown(engine, inputs, ran)
            row.kernel_ms_per_step, row.glue_kernels = profiled.by_class, profiled.glue_kernels
            if row_wise_fp8_weights(ran):  # the bytes model counts FP8 activations; a bf16 step's glue moves other bytes
                row.kernel_gbps = glue_bandwidth(row.kernel_ms_per_step, glue_bytes_of(engine, inputs, ran), ran.fused_kernels)
        report.images[f"stage {stage}"] = timed[-1].images[0]
        report.rows.append(row)
        base = (stage, timed[-1].config, row, pixels)
    _add_speedups([row for row in report.rows if row.error is None])
    if base is not None:
        if "cache" in settings.rows:
            report.cache_rows = _cache_rows(run, base)
        if "options" in settings.rows:
            report.option_rows = [_option_row(run, base, reference, label, changes, report) for label, changes in settings.options]
    if "main" not in settings.rows:
        report.rows = []  # the base preset ran only as the reference of the other rows
    bar.close()
    meta["settings"] = asdict(settings)
    return report


def glue_bytes_of(engine: KontextEngine, inputs: dict, config: OptimizationConfig) -> dict[str, float]:
    """The glue's bytes per transformer call for the profiled inputs (engine/benchmark/kernels.py)."""
    from .kernels import glue_bytes

    batch, image_tokens = inputs["hidden_states"].shape[:2]
    text_tokens = inputs["encoder_hidden_states"].shape[1]
    return glue_bytes(
        engine.loaded.pipe.transformer.config, batch, text_tokens, image_tokens, config.attention == "fa3_fp8", config.mlp_epilogue
    )


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def _stage_row(stage: int, warm: list[EditResult], timed: list[EditResult], cuda: bool) -> StageResult:
    last = timed[-1]
    return StageResult(
        stage=stage,
        adds=preset_title(stage) + (" (cache: see its own rows)" if stage == 1 else ""),
        active_stages=last.active_stages,
        skipped={name: why for name, why in last.skipped_stages.items() if name != "first_block_cache"},
        steps=last.steps,
        warmup_s=sum(r.timings.total_s for r in warm),
        text_encode_s=_median(r.timings.text_encode_s for r in timed),
        vae_encode_s=_median(r.timings.vae_encode_s for r in timed),
        median_step_s=_median(s for r in timed for s in r.timings.step_s),
        denoise_s=_median(r.timings.denoise_s for r in timed),
        vae_decode_s=_median(r.timings.vae_decode_s for r in timed),
        total_s=_median(r.timings.total_s for r in timed),
        peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        details={r.name: r.detail for r in last.stages if r.active},
    )


def _failed_row(stage: int, error: Exception) -> StageResult:
    nan = float("nan")
    message = (str(error).splitlines() or [""])[0][:500]
    return StageResult(stage, preset_title(stage), [], {}, 0, nan, nan, nan, nan, nan, nan, nan, None, error=message)


def _add_speedups(rows: list[StageResult]) -> None:
    if not rows:
        return
    first = rows[0]
    for previous, row in zip([None] + rows[:-1], rows):
        row.speedup_vs_stage0 = first.total_s / row.total_s if row.total_s else None
        row.step_speedup_vs_stage0 = first.median_step_s / row.median_step_s if row.median_step_s else None
        if previous is not None and row.total_s:
            row.speedup_vs_previous = previous.total_s / row.total_s


def _cache_backends(settings: BenchmarkSettings) -> list[str]:
    chosen = settings.overrides.get("cache_backend", "auto")
    return settings.cache_backends if chosen == "auto" else [chosen]


def _cache_rows(run: _Run, base) -> list[CacheResult]:
    """For each backend: the cache's cost when it never skips (a threshold so small every step
    computes), and its skip rate at the stack's threshold, both on top of the last preset that ran."""
    stage, config, uncached, _ = base
    rows = []
    for backend in _cache_backends(run.settings):
        for threshold, note in ((1e-9, "never skips: the cost of the check"), (0.12, "skip rate on random weights: not representative")):
            cached = config.with_changes(first_block_cache=True, cache_threshold=threshold, cache_backend=backend)
            try:
                warm, timed = run.edits(cached, f"cache {backend} {threshold:g}")
            except StageFailed as error:
                rows.append(CacheResult(stage, threshold, backend, float("nan"), None, 0, 0, f"failed: {error}"[:300]))
                continue
            stats = timed[-1].extras.get("first_block_cache", {})
            median_step = _median(s for r in timed for s in r.timings.step_s)
            cost = median_step - uncached.median_step_s if threshold < 1e-6 else None
            rows.append(
                CacheResult(
                    stage,
                    threshold,
                    stats.get("backend", "?"),
                    median_step,
                    cost,
                    stats.get("computed", 0),
                    stats.get("skipped", 0),
                    note,
                    sum(r.timings.total_s for r in warm),
                )
            )
    return rows


def _option_row(run: _Run, base, reference, label: str, changes: dict, report: BenchmarkReport) -> OptionResult:
    stage, config, base_row, stage_pixels = base
    nan = float("nan")
    try:
        warm, timed = run.edits(config.with_changes(**changes), label)
    except StageFailed as error:
        return OptionResult(label, stage, False, "", nan, nan, nan, None, None, None, error=str(error)[:300])
    last = timed[-1]
    ran = _option_ran(last, config, changes)
    pixels = np.asarray(last.images[0], dtype=np.float64) / 255.0
    median_step = _median(s for r in timed for s in r.timings.step_s)
    if ran:
        report.images[label] = last.images[0]
    return OptionResult(
        label,
        stage,
        ran,
        _option_detail(last.stages, changes),
        median_step,
        _median(r.timings.total_s for r in timed),
        sum(r.timings.total_s for r in warm),
        base_row.median_step_s / median_step if ran and median_step else None,  # a row that changed nothing has no speed-up
        deviation(pixels, reference)[0],
        deviation(pixels, stage_pixels)[0],
    )


def _option_ran(result: EditResult, base_config: OptimizationConfig, changes: dict) -> bool:
    """Whether the option changed what ran (not merely what was asked for)."""
    return any(getattr(result.config, name) != getattr(base_config, name) for name in changes)


def _option_detail(reports, changes: dict) -> str:
    """What an option row ran: the changed stages' details, "<stage> off" for those it switched off,
    and the reason for those this machine could not run."""
    changed_stages = {KNOBS[name].stage for name in changes}
    parts = []
    for report in reports:
        if report.name not in changed_stages:
            continue
        if report.active:
            parts.append(f"{report.name}: {report.detail}" if report.detail else report.name)
        elif report.requested:
            parts.append(f"{report.name} skipped: {report.reason}")
        else:
            parts.append(f"{report.name} off")
    return "; ".join(parts)
