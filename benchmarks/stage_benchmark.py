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
    extras: dict = field(default_factory=dict)


@dataclass
class BenchmarkReport:
    meta: dict
    rows: list[StageResult]

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
    )

    def as_dict(self) -> dict:
        return {"meta": self.meta, "rows": [asdict(row) for row in self.rows]}

    def markdown(self) -> str:
        header = "| " + " | ".join(title for _, title in self.COLUMNS) + " |"
        lines = [header, "|" + "---|" * len(self.COLUMNS)]
        for row in self.rows:
            cells = [_format(getattr(row, name)) for name, _ in self.COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        skipped = [f"- stage {row.stage}: {name} skipped: {why}" for row in self.rows for name, why in row.skipped.items()]
        meta = ", ".join(f"{key}: {value}" for key, value in self.meta.items() if key != "settings")
        return "\n".join([f"Kontext stage benchmark ({meta})", "", *lines, *([""] + skipped if skipped else [])])

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

    max_area = engine.loaded.spec.default_max_area
    side = int(max_area**0.5)
    width, height = settings.width or side, settings.height or side
    image = benchmark_input_image(width, height) if settings.with_input_image else None
    runs_per_stage = settings.warmup + settings.repeats
    total_runs = runs_per_stage * len(settings.stages)
    bar = tqdm(total=total_runs, desc="benchmark", disable=not show_progress)
    done = 0
    rows: list[StageResult] = []
    reference: np.ndarray | None = None
    cuda = engine.env.has_cuda

    for stage in settings.stages:
        config = cumulative_config(stage).with_changes(**settings.overrides)
        request = EditRequest(prompt=settings.prompt, image=image, width=width, height=height, seed=settings.seed)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        results = []
        for attempt in range(runs_per_stage):
            bar.set_postfix_str(f"stage {stage} {'warm-up' if attempt < settings.warmup else 'timed'}")
            results.append(engine.edit(request, config))
            done += 1
            bar.update()
            if on_progress:
                on_progress(f"stage {stage}: edit {attempt + 1}/{runs_per_stage}", done / total_runs)
        warm, timed = results[: settings.warmup], results[settings.warmup :] or results[-1:]
        pixels = np.asarray(timed[-1].images[0], dtype=np.float64) / 255.0
        if stage == settings.stages[0]:
            reference = pixels
        row = StageResult(
            stage=stage,
            adds=BENCHMARK_STAGE_CHANGES[stage][0],
            active_stages=timed[-1].active_stages,
            skipped={r.name: r.reason for r in timed[-1].stages if r.requested and not r.active},
            steps=timed[-1].steps,
            warmup_s=sum(r.timings.total_s for r in warm),
            text_encode_s=_median(r.timings.text_encode_s for r in timed),
            vae_encode_s=_median(r.timings.vae_encode_s for r in timed),
            median_step_s=_median(s for r in timed for s in r.timings.step_s),
            denoise_s=_median(r.timings.denoise_s for r in timed),
            vae_decode_s=_median(r.timings.vae_decode_s for r in timed),
            total_s=_median(r.timings.total_s for r in timed),
            peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            extras={key: value for key, value in timed[-1].extras.items()},
        )
        row.deviation_rel_l2, row.psnr_db = _deviation(pixels, reference)
        rows.append(row)
    bar.close()
    _add_speedups(rows)
    meta = environment_meta(engine)
    meta.update(width=width, height=height, input_image=settings.with_input_image, repeats=settings.repeats, warmup=settings.warmup, settings=asdict(settings))
    return BenchmarkReport(meta, rows)


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


def _deviation(pixels: np.ndarray, reference: np.ndarray | None) -> tuple[float | None, float | None]:
    if reference is None or pixels.shape != reference.shape:
        return None, None
    error = float(np.linalg.norm(pixels - reference) / max(np.linalg.norm(reference), 1e-12))
    mse = float(np.mean((pixels - reference) ** 2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
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
