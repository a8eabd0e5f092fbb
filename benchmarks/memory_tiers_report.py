"""The memory tiers benchmark's outputs: pixel agreement between tiers, then JSON, a markdown table
and a chart of GPU memory against time per tier (benchmarks/memory_tiers.py runs the jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.benchmark.report import json_safe

NOT_MEASURED = "cpu: not measured"


def compare_images(tiers: dict, images: Path) -> None:
    """Each tier's last output against the medium tier's (same FP8 weights and T5: the offload paths
    should match it) and the large tier's (bf16 T5, FP8 variant built at run time)."""
    pixels = {row: np.asarray(_open(images / f"{row}.png"), dtype=np.int16) for row in tiers if (images / f"{row}.png").exists()}
    # the reference rows, compiled or not (ROW-eager)
    references = {name: next((row for row in (name, f"{name}-eager") if row in pixels), None) for name in ("medium", "large")}
    for row, result in tiers.items():
        if row not in pixels:
            continue
        result["max_pixel_difference"] = {
            name: int(np.abs(pixels[row] - pixels[reference]).max())
            for name, reference in references.items()
            if reference is not None and reference != row and pixels[reference].shape == pixels[row].shape
        }


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_tiers.json").write_text(json.dumps(json_safe(report), indent=1) + "\n")
    (out / "memory_tiers.md").write_text(markdown(report) + "\n")
    chart(report, out / "memory_tiers.png")


def markdown(report: dict) -> str:
    command, tiers, loads = report["command"], report["tiers"], report["loads"]
    large = tiers.get("large", {})
    cap = "no memory cap on a CPU" if command["device"] == "cpu" else "under `torch.cuda.set_per_process_memory_fraction` of its budget"
    lines = [
        f"# Memory tiers: {command['model']} on {command['device']}, {command['size']}x{command['size']}, {command['steps']} steps",
        "",
        f"Each tier in its own process, {cap}; {command['warmup']} warm-up (at least one in a compiled row) "
        f"and {command['repeats']} timed edits. "
        f"Config: preset {command.get('preset', 0)} with each tier's memory knobs{_compile_note(command)}; "
        f"cold = the first warm-up edit (variant build, compile, CUDA graph recording), compile = its time beyond a warm edit. "
        f"Whole run {report['wall_s']} s.",
        "",
        "| row | tier | compile / graphs | budget GiB | estimate GiB | peak allocated GiB | peak reserved GiB | load s | cold edit s "
        "| cold compile s | median step ms | step vs large | edit s | edit vs large | text encode s | max pixel diff vs medium / large "
        "| status |",
        "|" + "---|" * 17,
    ]
    for row, result in tiers.items():
        if "error" in result:
            lines.append(f"| {row} | | | {_budget(result)} |" + " |" * 12 + f" FAILED: {result['error']} |")
            continue
        peak = _peak(result)
        diffs = result.get("max_pixel_difference", {})
        lines.append(
            f"| {row} | {result['plan']['tier']} | {_on(result.get('compile'))} / {_on(result.get('cuda_graphs'))} | {_budget(result)} "
            f"| {result.get('estimated_peak_gib', result['plan']['estimated_peak_gib_at_1024'])} "
            f"| {peak.get('peak_allocated_gib', NOT_MEASURED)} | {peak.get('peak_reserved_gib', NOT_MEASURED)} | {result['load_s']} "
            f"| {_dash(result.get('cold_first_edit_s'))} | {_dash(result.get('cold_compile_s'))} "
            f"| {result['median_step_ms']} | {_ratio(result, large, 'median_step_ms')} | {result['median_edit_s']} "
            f"| {_ratio(result, large, 'median_edit_s')} | {result['median_text_encode_s']} "
            f"| {diffs.get('medium', '-')} / {diffs.get('large', '-')} | ok |"
        )
    small = tiers.get("small", {})
    if "error" not in small and small:
        reserved = _peak(small).get("peak_reserved_gib")
        verdict = NOT_MEASURED if reserved is None else ("met" if reserved < report["small_tier_target_gib"] else "NOT met")
        lines += ["", f"Target, small tier peak under {report['small_tier_target_gib']:g} GiB (reserved, any phase): {verdict}."]
    lines += ["", "Estimate: engine/memory_plan.py at 1024x1024, with its compile and CUDA-graph allowances where the row has them."]
    lines += ["", "Memory per phase (peak allocated / reserved GiB): load, warm-up, timed edits.", ""]
    for row, result in tiers.items():
        if "memory" in result:
            parts = [f"{phase} {_pair(values)}" for phase, values in result["memory"].items()]
            lines.append(f"- {row}: {'; '.join(parts)}; skipped stages: {result['skipped_stages'] or 'none'}")
    lines += ["", "## Loading the transformer", "", "| how | format | load s | peak host GiB above start | peak GPU allocated GiB |"]
    lines.append("|---|---|---|---|---|")
    for how, result in loads.items():
        if "error" in result:
            lines.append(f"| {how} | | FAILED: {result['error']} | | |")
        else:
            lines.append(
                f"| {how} | {result['format']} | {result['load_s']} | {result['peak_host_gib_above_start']} "
                f"| {result.get('peak_allocated_gib', NOT_MEASURED)} |"
            )
    prepare = report["prepare"]
    lines += ["", f"Prepare: {json.dumps({k: v for k, v in prepare.items() if k != 'traceback'})}"]
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = {row: result for row, result in report["tiers"].items() if "error" not in result}
    figure, axes = plt.subplots(max(1, len(tiers)), 1, figsize=(9, 2.2 * max(1, len(tiers))), squeeze=False)
    for axis, (row, result) in zip(axes[:, 0], tiers.items()):
        for (name, start, end), shade in zip(result["phases"], ("#eeeeee", "#dde8f3", "#e6f2e0")):
            axis.axvspan(start, end, color=shade, label=name)
        timeline = np.array(result["timeline"]) if result["timeline"] else None
        if timeline is not None:
            axis.plot(timeline[:, 0], timeline[:, 1], label="allocated")
            axis.plot(timeline[:, 0], timeline[:, 2], linestyle="--", label="reserved")
            if result["budget_gib"]:
                axis.axhline(result["budget_gib"], color="red", linestyle=":", label="budget")
            axis.set_ylabel("GiB")
        else:
            axis.text(0.5, 0.5, NOT_MEASURED, transform=axis.transAxes, ha="center", va="center")
        axis.set_title(f"{row}: {result['median_step_ms']} ms/step, {result['median_edit_s']} s/edit", fontsize=9)
        axis.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds since the process started its job")
    figure.suptitle(f"GPU memory per tier, {report['command']['model']} on {report['command']['device']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _open(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def _peak(result: dict) -> dict:
    """The highest peaks over all phases (a tier's budget must hold every one of them)."""
    phases = [values for values in result["memory"].values() if "peak_reserved_gib" in values]
    if not phases:
        return {}
    return {key: max(values[key] for values in phases) for key in ("peak_allocated_gib", "peak_reserved_gib")}


def _pair(values: dict) -> str:
    return f"{values['peak_allocated_gib']} / {values['peak_reserved_gib']}" if "peak_reserved_gib" in values else NOT_MEASURED


def _compile_note(command: dict) -> str:
    if command.get("no_compile"):
        return ", compile OFF in every row (--no-compile)"
    return "; compile on unless the row is named -eager or a rule switches it off (skipped stages, below)"


def _on(value) -> str:
    return "-" if value is None else ("on" if value else "off")


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _budget(result: dict) -> str:
    budget = result.get("budget_gib")
    return "whole GPU" if budget is None else f"{budget:g}"


def _ratio(result: dict, large: dict, key: str) -> str:
    if not large or "error" in large or not large.get(key):
        return "-"
    return f"x{result[key] / large[key]:.2f}"
