"""What a benchmark run produces: rows, the markdown table, CSV/JSON, a chart and a contact sheet."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# benchmarks/results/ of this checkout: where measured runs are kept next to the lab scripts.
RESULTS_ROOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


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
    kernel_ms_per_step: dict[str, float] = field(default_factory=dict)  # profiler, by kernel class (GPU)
    kernel_gbps: dict[str, float] = field(default_factory=dict)  # bytes moved / kernel time, by class and for all glue (GPU)
    glue_kernels: list[dict] = field(default_factory=list)  # the largest non-GEMM, non-attention kernels by name (GPU)
    error: str | None = None  # the stage could not run here; the message says why
    details: dict[str, str] = field(default_factory=dict)  # what each active stage ran


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
    ran: bool  # False: the option's stage could not run here, so the row measures nothing new
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
    images: dict[str, Image.Image] = field(default_factory=dict, repr=False)  # label -> output, for the contact sheet

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
        ("psnr_db", "PSNR vs 0 dB"),
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
        meta = ", ".join(f"{key}: {value}" for key, value in self.meta.items() if key not in ("settings", "ceilings_tflops", "step_flops"))
        lines = [f"Kontext stage benchmark ({meta})", ""]
        if self.rows:
            lines += [_table([title for _, title in self.COLUMNS], [[getattr(row, name) for name, _ in self.COLUMNS] for row in self.rows])]
            notes = [f"- stage {row.stage}: {name} skipped: {why}" for row in self.rows for name, why in row.skipped.items()]
            notes += [f"- stage {row.stage} FAILED: {row.error}" for row in self.rows if row.error]
            lines += [""] + notes if notes else []
        lines += self._kernel_lines() + self._cache_lines() + self._option_lines()
        if self.meta.get("ceilings_tflops"):
            lines += [
                "",
                f"Ceilings measured in this run (TFLOP/s): {self.meta['ceilings_tflops']}",
                f"FLOPs per step: {self.meta.get('step_flops')}",
            ]
        return "\n".join(lines)

    def _kernel_lines(self) -> list[str]:
        profiled = [row for row in self.rows if row.kernel_ms_per_step]
        if not profiled:
            return []
        classes = list(dict.fromkeys(name for row in profiled for name in row.kernel_ms_per_step))
        body = [
            [row.stage, *(row.kernel_ms_per_step.get(name) for name in classes), row.median_step_s * 1e3, row.floor_ms_per_step]
            for row in profiled
        ]
        title = "Where a step's time goes (profiler, ms per step by kernel class; gaps = step time minus the sum of kernel time)"
        lines = ["", title, "", _table(["stage", *classes, "measured step", "floor"], body)]
        rated = [row for row in profiled if row.kernel_gbps]
        if rated:
            rate_classes = list(dict.fromkeys(name for row in rated for name in row.kernel_gbps))
            copy = self.meta.get("copy_bandwidth_gbps")
            lines += [
                "",
                "Bandwidth of the glue (GB/s: the bytes the fused kernels move, engine/benchmark/kernels.py glue_bytes, over the "
                "time of their kernel class; 'all glue' over every non-GEMM, non-attention kernel; "
                f"copy bandwidth in this run: {copy} GB/s)",
                "",
                _table(["stage", *rate_classes], [[row.stage, *(row.kernel_gbps.get(name) for name in rate_classes)] for row in rated]),
            ]
        for row in profiled:
            if row.glue_kernels:
                body = [[kernel["kernel"], kernel["class"], kernel["ms"], kernel["calls"]] for kernel in row.glue_kernels]
                title = f"Stage {row.stage}: the largest glue kernels (ms per step, profiler names)"
                lines += ["", title, "", _table(["kernel", "class", "ms", "calls"], body)]
        return lines

    def _cache_lines(self) -> list[str]:
        if not self.cache_rows:
            return []
        title = "First-block cache (on top of the stage shown; random weights: the skip rate is NOT representative of real images)"
        head = ["stage", "threshold", "backend", "step s (median)", "cost vs uncached s/step", "computed", "skipped", "warm-up s"]
        body = [
            [c.stage, c.threshold, c.backend, c.median_step_s, c.step_cost_vs_uncached_s, c.computed, c.skipped, c.warmup_s]
            for c in self.cache_rows
        ]
        return ["", title, "", _table(head, body)]

    def _option_lines(self) -> list[str]:
        if not self.option_rows:
            return []
        head = [
            "option",
            "on stage",
            "what ran",
            "step s (median)",
            "total s",
            "x step vs stage",
            "rel. L2 vs 0",
            "rel. L2 vs stage",
            "warm-up s",
        ]
        body = [
            [
                o.label,
                o.on_top_of_stage,
                o.error or o.detail,
                o.median_step_s,
                o.total_s,
                o.step_speedup_vs_stage,
                o.deviation_vs_stage0,
                o.deviation_vs_stage,
                o.warmup_s,
            ]
            for o in self.option_rows
        ]
        return ["", "Options (off by default) on top of the stage shown", "", _table(head, body)]

    def csv(self) -> str:
        buffer = io.StringIO()
        fields = list(asdict(self.rows[0])) if self.rows else []
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        for row in self.rows:
            writer.writerow({key: json.dumps(value) if isinstance(value, (list, dict)) else value for key, value in asdict(row).items()})
        return buffer.getvalue()


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(head: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_format(cell) for cell in row) + " |" for row in body]
    return "\n".join(lines)


def json_safe(value):
    """inf/nan become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def default_results_dir(report: BenchmarkReport) -> Path:
    device = re.sub(r"[^a-z0-9]+", "-", str(report.meta.get("device", "cpu")).lower()).strip("-")
    return RESULTS_ROOT / f"{device}-{dt.date.today().isoformat()}"


def write_results(report: BenchmarkReport, directory: Path | None = None) -> Path:
    """stages.json/.csv/.md, the time chart (stages.png) and the contact sheet (contact_sheet.png)."""
    directory = Path(directory) if directory else default_results_dir(report)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stages.json").write_text(json.dumps(json_safe(report.as_dict()), indent=2))
    (directory / "stages.md").write_text(report.markdown() + "\n")
    if report.rows:
        (directory / "stages.csv").write_text(report.csv())
        _plot(report, directory / "stages.png")
    if report.images:
        contact_sheet(report).save(directory / "contact_sheet.png")
    return directory


def deviation(pixels: np.ndarray, reference: np.ndarray | None) -> tuple[float | None, float | None]:
    """(relative L2, PSNR in dB) of an image against a reference in 0..1 units; PSNR None when identical."""
    if reference is None or pixels.shape != reference.shape:
        return None, None
    error = float(np.linalg.norm(pixels - reference) / max(np.linalg.norm(reference), 1e-12))
    mse = float(np.mean((pixels - reference) ** 2))
    return error, (None if mse == 0 else float(10 * np.log10(1.0 / mse)))


def contact_sheet(report: BenchmarkReport, tile: int = 320) -> Image.Image:
    """Every output side by side, each captioned with its speed and its distance from stage 0."""
    reference = next(iter(report.images.values()))
    reference_pixels = np.asarray(reference, dtype=np.float64) / 255.0
    captions = {f"stage {row.stage}": row for row in report.rows}
    captions.update({option.label: option for option in report.option_rows})
    font = ImageFont.load_default(size=14)
    caption_height = 58
    sheet = Image.new("RGB", (tile * len(report.images), tile + caption_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (label, image) in enumerate(report.images.items()):
        scale = tile / max(image.size)
        sheet.paste(image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale)))), (index * tile, 0))
        rel, psnr = deviation(np.asarray(image, dtype=np.float64) / 255.0, reference_pixels)
        row = captions.get(label)
        step = f"{row.median_step_s * 1e3:.1f} ms/step" if row is not None and not math.isnan(row.median_step_s) else ""
        quality = (
            "reference" if index == 0 else f"PSNR {psnr:.1f} dB, rel. L2 {rel:.3f}" if psnr is not None else "identical to the reference"
        )
        draw.text((index * tile + 6, tile + 4), f"{label}  {step}", fill="black", font=font)
        draw.text((index * tile + 6, tile + 24), quality, fill="black", font=font)
    return sheet


def _plot(report: BenchmarkReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report.rows if row.error is None]
    labels = [f"stage {row.stage}" for row in rows]
    parts = [("text_encode_s", "text encode"), ("vae_encode_s", "VAE encode"), ("denoise_s", "denoise"), ("vae_decode_s", "VAE decode")]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(len(rows))
    for name, title in parts:
        values = np.array([getattr(row, name) for row in rows])
        axis.bar(labels, values, bottom=bottom, label=title)
        bottom += values
    for x, row in enumerate(rows):
        axis.text(x, row.total_s, f"{row.total_s:.2f}s\nx{row.speedup_vs_stage0 or 1:.2f}", ha="center", va="bottom", fontsize=8)
    axis.set_ylabel("seconds per edit (median)")
    axis.set_title(
        f"Kontext edit by cumulative stage, {report.meta.get('device')} ({report.meta.get('width')}x{report.meta.get('height')})"
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
