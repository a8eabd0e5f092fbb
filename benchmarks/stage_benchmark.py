"""The stage-by-stage benchmark: cumulative stages 0..5 in one process, through the engine's own
edit path, shared by `flux_kontext_optimized.py benchmark` and `GET /benchmark`.

For each stage: untimed warm-up edits (compilation happens there and is reported as warm-up time),
then timed edits whose text-encode, VAE-encode, per-step, denoise, VAE-decode and end-to-end times
are reported as medians, with peak GPU memory, speedups and the output's deviation from stage 0.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import io
import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine import EditRequest, KontextEngine
from stages import BENCHMARK_STAGE_CHANGES, MAX_STAGE, cumulative_config

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


@dataclass
class BenchmarkSettings:
    stages: list[int] = field(default_factory=lambda: list(range(MAX_STAGE + 1)))
    width: int | None = None  # default: the model's pixel budget (1024x1024 full, 256x256 tiny)
    height: int | None = None
    repeats: int = 3
    warmup: int = 1
    with_input_image: bool = True
    prompt: str = "make the sky red"
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # applied on top of every stage's config
    # The cumulative rows run with the first-block cache off: its skip rate on random weights says
    # nothing about real images, so its cost and skip rate are reported in rows of their own.
    cache_rows: bool = True
    # Both implementations are measured, so the `auto` default rests on a comparison; an explicit
    # cache_backend override narrows the rows to that one.
    cache_backends: list[str] = field(default_factory=lambda: ["para_attn", "diffusers"])
    # Options measured on top of the last stage that ran (label, config changes): off by default in
    # the stack, reported with their speed and their deviation.
    option_rows: list = field(default_factory=lambda: [
        ("FP8 attention (fa3_fp8)", {"attention": "fa3_fp8"}),
        # a stage-1 speed-up switched back off: its own contribution, measured on the full stack
        ("without sigmoid-form GELU (fast_gelu off)", {"fast_gelu": False}),
        # eager: emulated MX would spend minutes in Inductor autotuning for a format nobody should pick on Hopper
        ("explicit mxfp4, eager (emulated below Blackwell)", {"quantization": "mxfp4", "compile": False, "cuda_graphs": False}),
    ])
    roofline: bool = True  # GPU only: FLOPs per step, kernel ceilings measured in this run, floor


@dataclass
class StageResult:
    stage: int
    adds: str
    active_stages: list[str]
    skipped: dict[str, str]
    steps: int
    warmup_s: float
    text_encode_s: float
    vae_encode_s: float
    median_step_s: float
    denoise_s: float
    vae_decode_s: float
    total_s: float
    peak_memory_gb: float | None
    deviation_rel_l2: float | None = None  # vs stage 0's output, same seed
    psnr_db: float | None = None
    speedup_vs_stage0: float | None = None
    speedup_vs_previous: float | None = None
    step_speedup_vs_stage0: float | None = None
    floor_ms_per_step: float | None = None
    roofline_ratio: float | None = None  # measured step time / floor
    error: str | None = None  # the stage could not run here; the message says why
    extras: dict = field(default_factory=dict)


@dataclass
class CacheResult:
    stage: int
    threshold: float
    backend: str
    median_step_s: float
    step_cost_vs_uncached_s: float | None
    computed: int
    skipped: int
    note: str
    warmup_s: float | None = None  # includes compiling the cached variant


@dataclass
class OptionResult:
    label: str
    on_top_of_stage: int
    detail: str
    median_step_s: float
    total_s: float
    warmup_s: float
    step_speedup_vs_stage: float | None
    deviation_vs_stage0: float | None
    deviation_vs_stage: float | None
    error: str | None = None


@dataclass
class BenchmarkReport:
    meta: dict
    rows: list[StageResult]
    cache_rows: list[CacheResult] = field(default_factory=list)
    option_rows: list[OptionResult] = field(default_factory=list)

    COLUMNS = (
        ("stage", "stage"),
        ("adds", "adds"),
        ("steps", "steps"),
        ("text_encode_s", "text enc s"),
        ("vae_encode_s", "VAE enc s"),
        ("median_step_s", "step s (median)"),
        ("denoise_s", "denoise s"),
        ("vae_decode_s", "VAE dec s"),
        ("total_s", "total s"),
        ("speedup_vs_stage0", "x vs 0"),
        ("speedup_vs_previous", "x vs prev"),
        ("warmup_s", "warm-up s"),
        ("peak_memory_gb", "peak GB"),
        ("deviation_rel_l2", "rel. L2 vs 0"),
        ("floor_ms_per_step", "floor ms/step"),
        ("roofline_ratio", "step / floor"),
    )

    def as_dict(self) -> dict:
        return {
            "meta": self.meta,
            "rows": [asdict(row) for row in self.rows],
            "cache_rows": [asdict(row) for row in self.cache_rows],
            "option_rows": [asdict(row) for row in self.option_rows],
        }

    def markdown(self) -> str:
        header = "| " + " | ".join(title for _, title in self.COLUMNS) + " |"
        lines = [header, "|" + "---|" * len(self.COLUMNS)]
        for row in self.rows:
            cells = [_format(getattr(row, name)) for name, _ in self.COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- stage {row.stage}: {name} skipped: {why}" for row in self.rows for name, why in row.skipped.items()]
        notes += [f"- stage {row.stage} FAILED: {row.error}" for row in self.rows if row.error]
        cache = []
        if self.cache_rows:
            cache = ["", "First-block cache (on top of the stage shown; random weights: the skip rate is NOT representative of real images)", "",
                     "| stage | threshold | backend | step s (median) | cost vs uncached s/step | computed | skipped | warm-up s |", "|---|---|---|---|---|---|---|---|"]
            cache += [f"| {c.stage} | {c.threshold:g} | {c.backend} | {c.median_step_s:.4g} | {_format(c.step_cost_vs_uncached_s)} | {c.computed} | {c.skipped} | {_format(c.warmup_s)} |" for c in self.cache_rows]
        options = []
        if self.option_rows:
            options = ["", "Options (off by default) on top of the stage shown", "",
                       "| option | on stage | what ran | step s (median) | total s | x step vs stage | rel. L2 vs 0 | rel. L2 vs stage | warm-up s |", "|---|---|---|---|---|---|---|---|---|"]
            options += [f"| {o.label} | {o.on_top_of_stage} | {o.error or o.detail} | {_format(o.median_step_s)} | {_format(o.total_s)} | {_format(o.step_speedup_vs_stage)} | {_format(o.deviation_vs_stage0)} | {_format(o.deviation_vs_stage)} | {_format(o.warmup_s)} |" for o in self.option_rows]
        cache += options
        meta = ", ".join(f"{key}: {value}" for key, value in self.meta.items() if key not in ("settings", "ceilings_tflops", "step_flops"))
        roofline = []
        if self.meta.get("ceilings_tflops"):
            roofline = ["", f"Ceilings measured in this run (TFLOP/s): {self.meta['ceilings_tflops']}", f"FLOPs per step: {self.meta.get('step_flops')}"]
        return "\n".join([f"Kontext stage benchmark ({meta})", "", *lines, *([""] + notes if notes else []), *cache, *roofline])

    def csv(self) -> str:
        buffer = io.StringIO()
        fields = [name for name in asdict(self.rows[0]) if name != "extras"] if self.rows else []
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({key: json.dumps(value) if isinstance(value, (list, dict)) else value for key, value in asdict(row).items()})
        return buffer.getvalue()


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def parse_stage_list(text: str) -> list[int]:
    stages: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            low, high = (int(x) for x in part.split("-", 1))
            stages.extend(range(low, high + 1))
        elif part:
            stages.append(int(part))
    if not stages or any(not 0 <= s <= MAX_STAGE for s in stages):
        raise ValueError(f"stages must lie in 0-{MAX_STAGE}, got {text!r}")
    return sorted(set(stages))


def benchmark_input_image(width: int, height: int) -> Image.Image:
    """A deterministic picture with edges, gradients and flat areas (a 'sky' to make red)."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = np.concatenate([0.3 + 0.5 * y * np.ones_like(x), 0.5 + 0.3 * x * np.ones_like(y), 0.9 - 0.4 * y * np.ones_like(x)], axis=2)
    image = Image.fromarray((pixels * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, height), (width * 0.35, height * 0.45), (width * 0.7, height), ], fill=(70, 90, 60))
    draw.ellipse([width * 0.65, height * 0.1, width * 0.85, height * 0.3], fill=(250, 220, 120))
    return image


def environment_meta(engine: KontextEngine) -> dict:
    env = engine.env
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fa3_fwd": version("fa3-fwd"),
        "para_attn": version("para-attn"),
        "device": env.gpu.name if env.gpu else "cpu",
        "torch": env.torch_version,
        "cuda": env.torch_cuda,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "torchao": version("torchao"),
        "model": engine.loaded.spec.name,
        "random_weights": engine.loaded.spec.random_weights,
    }


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
    request = EditRequest(prompt=settings.prompt, image=image, width=width, height=height, seed=settings.seed)
    cuda = engine.env.has_cuda
    per_stage = settings.warmup + max(settings.repeats, 1)
    total = per_stage * (len(settings.stages) + (2 * len(_cache_backends(settings)) if settings.cache_rows else 0) + len(settings.option_rows))
    bar = tqdm(total=total, desc="benchmark", disable=not show_progress)
    progress = {"done": 0}

    def tick(label: str) -> None:
        progress["done"] += 1
        bar.set_postfix_str(label)
        bar.update()
        if on_progress:
            on_progress(label, min(progress["done"] / total, 1.0))

    meta = environment_meta(engine)
    meta.update(width=width, height=height, input_image=settings.with_input_image, repeats=settings.repeats, warmup=settings.warmup)
    flops = ceilings = None
    if cuda and settings.roofline:
        from .roofline import count_step_flops, measure_ceilings

        flops = count_step_flops(engine, request)
        ceilings = measure_ceilings(flops.attention_shape)
        meta.update(step_flops={k: (round(v / 1e12, 2) if isinstance(v, float) else v) for k, v in flops.as_dict().items()}, ceilings_tflops=ceilings)

    rows: list[StageResult] = []
    reference: np.ndarray | None = None
    last_good: tuple[int, object] | None = None
    for stage in settings.stages:
        config = cumulative_config(stage).with_changes(**{"first_block_cache": False, **settings.overrides})
        try:
            warm, timed = _run_edits(engine, request, config, settings, cuda, lambda i: tick(f"stage {stage} edit {i}"))
        except StageFailed as error:  # a stage that cannot run here must not hide the others' results
            rows.append(_failed_row(stage, error))
            progress["done"] = min(progress["done"], total)
            continue
        row = _stage_row(stage, warm, timed, cuda)
        pixels = np.asarray(timed[-1].images[0], dtype=np.float64) / 255.0
        reference = pixels if reference is None else reference
        row.deviation_rel_l2, row.psnr_db = _deviation(pixels, reference)
        if flops and ceilings:
            from .roofline import floor_ms

            row.floor_ms_per_step = floor_ms(flops, ceilings, timed[-1].config)
            if row.floor_ms_per_step:
                row.roofline_ratio = row.median_step_s * 1e3 / row.floor_ms_per_step
        rows.append(row)
        row.extras["_pixels"] = pixels  # for the option rows; dropped before writing
        last_good = (stage, timed[-1].config, row)
    _add_speedups([row for row in rows if row.error is None])
    cache_rows = _cache_rows(engine, request, settings, cuda, last_good, tick) if settings.cache_rows and last_good else []
    option_rows = [_option_row(engine, request, settings, cuda, last_good, reference, label, changes, tick) for label, changes in settings.option_rows] if last_good else []
    bar.close()
    for row in rows:
        row.extras.pop("_pixels", None)
    meta["settings"] = asdict(settings)
    return BenchmarkReport(meta, rows, cache_rows, option_rows)


def _option_row(engine, request, settings, cuda, last_good, reference, label, changes, tick) -> OptionResult:
    stage, config, base_row = last_good
    try:
        warm, timed = _run_edits(engine, request, config.with_changes(**changes), settings, cuda, lambda i: tick(f"{label} edit {i}"))
    except StageFailed as error:
        nan = float("nan")
        return OptionResult(label, stage, "", nan, nan, nan, None, None, None, error=str(error)[:300])
    last = timed[-1]
    pixels = np.asarray(last.images[0], dtype=np.float64) / 255.0
    stage_pixels = base_row.extras.get("_pixels")
    median_step = _median(s for r in timed for s in r.timings.step_s)
    detail = _option_detail(last.stages, changes)
    return OptionResult(
        label,
        stage,
        detail,
        median_step,
        _median(r.timings.total_s for r in timed),
        sum(r.timings.total_s for r in warm),
        base_row.median_step_s / median_step if median_step else None,
        _deviation(pixels, reference)[0],
        _deviation(pixels, stage_pixels)[0] if stage_pixels is not None else None,
    )


def _option_detail(reports, changes: dict) -> str:
    """What an option row ran: the changed stages' details, "<stage> off" for those it switched off,
    and the reason for those this machine could not run."""
    parts = []
    for report in reports:
        if report.name not in changes:
            continue
        if report.active:
            parts.append(f"{report.name}: {report.detail}" if report.detail else report.name)
        elif report.requested:
            parts.append(f"{report.name} skipped: {report.reason}")
        else:
            parts.append(f"{report.name} off")
    return "; ".join(parts)


class StageFailed(Exception):
    """An edit of one stage failed on this machine; the benchmark records it and goes on."""


def _run_edits(engine, request, config, settings, cuda, tick):
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    results = []
    for attempt in range(settings.warmup + max(settings.repeats, 1)):
        try:
            results.append(engine.edit(request, config))
        except Exception as error:
            raise StageFailed(f"{type(error).__name__}: {error}") from error
        tick(attempt + 1)  # outside the try: a progress callback may stop the whole run (cancellation)
    return results[: settings.warmup], results[settings.warmup :]


def _stage_row(stage: int, warm, timed, cuda: bool) -> StageResult:
    last = timed[-1]
    return StageResult(
        stage=stage,
        adds=BENCHMARK_STAGE_CHANGES[stage][0] + (" (cache: see its own rows)" if stage == 1 else ""),
        active_stages=last.active_stages,
        skipped={r.name: r.reason for r in last.stages if r.requested and not r.active and r.name != "first_block_cache"},
        steps=last.steps,
        warmup_s=sum(r.timings.total_s for r in warm),
        text_encode_s=_median(r.timings.text_encode_s for r in timed),
        vae_encode_s=_median(r.timings.vae_encode_s for r in timed),
        median_step_s=_median(s for r in timed for s in r.timings.step_s),
        denoise_s=_median(r.timings.denoise_s for r in timed),
        vae_decode_s=_median(r.timings.vae_decode_s for r in timed),
        total_s=_median(r.timings.total_s for r in timed),
        peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        extras={"details": {r.name: r.detail for r in last.stages if r.active}},
    )


def _failed_row(stage: int, error: Exception) -> StageResult:
    nan = float("nan")
    message = (str(error).splitlines() or [""])[0][:500]
    return StageResult(stage, BENCHMARK_STAGE_CHANGES[stage][0], [], {}, 0, nan, nan, nan, nan, nan, nan, nan, None, error=message)


def _cache_backends(settings: BenchmarkSettings) -> list[str]:
    chosen = settings.overrides.get("cache_backend", "auto")
    return settings.cache_backends if chosen == "auto" else [chosen]


def _cache_rows(engine, request, settings, cuda, last_good, tick) -> list[CacheResult]:
    """For each backend: the cache's cost when it never skips (a threshold so small every step
    computes), and its skip rate at the stack's threshold, both on top of the last stage that ran."""
    stage, config, uncached = last_good
    rows = []
    for backend in _cache_backends(settings):
        for threshold, note in ((1e-9, "never skips: the cost of the check"), (0.12, "skip rate on random weights: not representative")):
            cached = config.with_changes(first_block_cache=True, cache_threshold=threshold, cache_backend=backend)
            try:
                warm, timed = _run_edits(engine, request, cached, settings, cuda, lambda i: tick(f"cache {backend} {threshold:g} edit {i}"))
            except StageFailed as error:
                rows.append(CacheResult(stage, threshold, backend, float("nan"), None, 0, 0, f"failed: {error}"[:300]))
                continue
            stats = timed[-1].extras.get("first_block_cache", {})
            median_step = _median(s for r in timed for s in r.timings.step_s)
            cost = median_step - uncached.median_step_s if threshold < 1e-6 else None
            rows.append(CacheResult(stage, threshold, stats.get("backend", "?"), median_step, cost, stats.get("computed", 0), stats.get("skipped", 0), note,
                                    sum(r.timings.total_s for r in warm)))
    return rows


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


def _deviation(pixels: np.ndarray, reference: np.ndarray | None) -> tuple[float | None, float | None]:
    if reference is None or pixels.shape != reference.shape:
        return None, None
    error = float(np.linalg.norm(pixels - reference) / max(np.linalg.norm(reference), 1e-12))
    mse = float(np.mean((pixels - reference) ** 2))
    psnr = None if mse == 0 else float(10 * np.log10(1.0 / mse))  # identical: PSNR is undefined (and not JSON)
    return error, psnr


def _add_speedups(rows: list[StageResult]) -> None:
    if not rows:
        return
    first = rows[0]
    for previous, row in zip([None] + rows[:-1], rows):
        row.speedup_vs_stage0 = first.total_s / row.total_s if row.total_s else None
        row.step_speedup_vs_stage0 = first.median_step_s / row.median_step_s if row.median_step_s else None
        if previous is not None and row.total_s:
            row.speedup_vs_previous = previous.total_s / row.total_s


def default_results_dir(report: BenchmarkReport) -> Path:
    device = re.sub(r"[^a-z0-9]+", "-", str(report.meta.get("device", "cpu")).lower()).strip("-")
    return RESULTS_ROOT / f"{device}-{dt.date.today().isoformat()}"


def write_results(report: BenchmarkReport, directory: Path | None = None) -> Path:
    directory = Path(directory) if directory else default_results_dir(report)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stages.json").write_text(json.dumps(report.as_dict(), indent=2, default=str))
    (directory / "stages.csv").write_text(report.csv())
    (directory / "stages.md").write_text(report.markdown() + "\n")
    _plot(report, directory / "stages.png")
    return directory


def _plot(report: BenchmarkReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"stage {row.stage}" for row in report.rows]
    parts = [("text_encode_s", "text encode"), ("vae_encode_s", "VAE encode"), ("denoise_s", "denoise"), ("vae_decode_s", "VAE decode")]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(len(report.rows))
    for name, title in parts:
        values = np.array([getattr(row, name) for row in report.rows])
        axis.bar(labels, values, bottom=bottom, label=title)
        bottom += values
    for x, row in enumerate(report.rows):
        axis.text(x, row.total_s, f"{row.total_s:.2f}s\nx{row.speedup_vs_stage0 or 1:.2f}", ha="center", va="bottom", fontsize=8)
    axis.set_ylabel("seconds per edit (median)")
    axis.set_title(f"Kontext edit by cumulative stage, {report.meta.get('device')} ({report.meta.get('width')}x{report.meta.get('height')})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
