"""The stage benchmark through the engine's own path (tiny model, CPU): table, files, contact sheet,
row selection, failures and cancellation. Speed is not asserted here: it is measured by the
benchmark itself, on the machine it runs on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.benchmark.report import write_results
from engine.benchmark.runner import BenchmarkSettings, parse_row_kinds, run_benchmark

SMALL = dict(width=64, height=64, repeats=1, warmup=0, overrides={"compile": False})  # compile off: seconds, not minutes, on a CPU


def test_benchmark_writes_every_format_with_cache_and_option_rows(tiny_engine, tmp_path):
    options = [("FP8 attention", {"attention": "fa3_fp8"}), ("no fused QKV", {"fuse_qkv": False})]
    report = run_benchmark(tiny_engine, BenchmarkSettings(stages=[0, 4], options=options, **SMALL))
    assert [row.stage for row in report.rows] == [0, 4]
    stage0, stage4 = report.rows
    assert stage0.steps == 28 and stage4.steps == 14  # stage 4 is DPM-Solver++ at 14 steps
    assert stage0.deviation_rel_l2 == 0.0 and stage0.psnr_db is None and stage4.deviation_rel_l2 > 0
    assert "fuse_qkv" in stage4.active_stages and stage4.details["scheduler"].startswith("DPM-Solver++")
    # both cache backends are measured, each with a never-skipping and a default-threshold row
    expected = [("para_attn", 1e-9), ("para_attn", 0.12), ("diffusers", 1e-9), ("diffusers", 0.12)]
    assert [(c.backend, c.threshold) for c in report.cache_rows] == expected
    assert all(c.skipped == 0 and c.computed == 14 for c in report.cache_rows if c.threshold < 1e-6)
    fp8, unfused = report.option_rows
    # An option this machine cannot run measures nothing new: no speed-up is claimed for it.
    assert not fp8.ran and fp8.step_speedup_vs_stage is None and "skipped" in fp8.detail and "CUDA" in fp8.detail
    assert unfused.ran and unfused.detail == "fuse_qkv off" and unfused.step_speedup_vs_stage is not None
    directory = write_results(report, tmp_path)
    assert {p.name for p in directory.iterdir()} == {"stages.json", "stages.csv", "stages.md", "stages.png", "contact_sheet.png"}
    json.loads((directory / "stages.json").read_text())  # strict JSON: no Infinity or NaN literals
    markdown = (directory / "stages.md").read_text()
    assert "| 4 |" in markdown and "PSNR vs 0 dB" in markdown and "naive bf16" not in markdown


def test_contact_sheet_shows_every_output_with_its_distance_from_stage_0(tiny_engine, tmp_path):
    report = run_benchmark(tiny_engine, BenchmarkSettings(stages=[0, 4], rows=("main",), **SMALL))
    assert list(report.images) == ["stage 0", "stage 4"]
    write_results(report, tmp_path)
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.width == 2 * 320 and sheet.height > 320
        pixels = np.asarray(sheet.convert("RGB"))
    # each tile holds its stage's picture (scaled), not a blank
    for index, label in enumerate(report.images):
        tile = pixels[:320, index * 320 : (index + 1) * 320]
        expected = np.asarray(report.images[label].resize((320, 320)))
        assert np.abs(tile.astype(int) - expected.astype(int)).mean() < 2.0


def test_row_selection_runs_only_what_was_asked(tiny_engine):
    calls = []
    original = tiny_engine.edit

    def counting_edit(request, config=None, **kwargs):
        calls.append(config)
        return original(request, config, **kwargs)

    tiny_engine.edit = counting_edit
    try:
        main_only = run_benchmark(tiny_engine, BenchmarkSettings(stages=[0, 4], rows=("main",), **SMALL))
        assert len(calls) == 2 and main_only.cache_rows == [] and main_only.option_rows == []
        calls.clear()
        settings = BenchmarkSettings(stages=[0, 4], rows=("options",), options=[("no QKV", {"fuse_qkv": False})], **SMALL)
        options_only = run_benchmark(tiny_engine, settings)
        assert len(calls) == 2  # the last preset (as the options' base) and the one option
        assert options_only.rows == [] and len(options_only.option_rows) == 1 and options_only.option_rows[0].on_top_of_stage == 4
    finally:
        del tiny_engine.edit
    assert parse_row_kinds("main, options") == ("main", "options")
    with pytest.raises(ValueError, match="choose from"):
        parse_row_kinds("everything")


def test_a_failing_stage_is_recorded_and_the_others_still_run(tiny_engine, monkeypatch):
    original = tiny_engine.edit

    def edit(request, config=None, **kwargs):
        if config is not None and config.scheduler != "euler":
            raise RuntimeError("simulated kernel failure")
        return original(request, config, **kwargs)

    monkeypatch.setattr(tiny_engine, "edit", edit)
    report = run_benchmark(tiny_engine, BenchmarkSettings(stages=[0, 4], rows=("main",), **SMALL))
    assert report.rows[0].error is None and "simulated kernel failure" in report.rows[1].error
    assert "stage 4 FAILED" in report.markdown()


def test_a_progress_callback_can_cancel_the_run(tiny_engine):
    class Stop(Exception):
        pass

    seen = []

    def on_progress(message, fraction):
        seen.append(message)
        raise Stop(message)

    with pytest.raises(Stop):
        run_benchmark(tiny_engine, BenchmarkSettings(stages=[0, 4], **SMALL), on_progress=on_progress)
    assert seen == ["stage 0 edit 1"]  # stopped after the first edit: nothing else ran


def test_the_profiled_glue_kernels_are_listed_by_name_under_their_class_table():
    """A GPU profile's largest glue kernels show in the markdown next to the class totals, so that a
    class's time can be read kernel by kernel (the profiler itself runs only on a GPU)."""
    from engine.benchmark.report import BenchmarkReport, StageResult

    row = StageResult(5, "CUDA graphs", [], {}, 14, 1.0, 0.03, 0.05, 0.163, 2.3, 0.05, 2.46, None)
    row.kernel_ms_per_step = {"gemm": 76.2, "other elementwise (eager)": 1.08, "gaps": 3.8}
    eager = "other elementwise (eager)"
    row.glue_kernels = [{"kernel": "void at::native::elementwise_kernel<128, 2>", "class": eager, "ms": 0.412, "calls": 6}]
    markdown = BenchmarkReport(meta={}, rows=[row]).markdown()
    assert "Stage 5: the largest glue kernels" in markdown
    assert "| void at::native::elementwise_kernel<128, 2> | other elementwise (eager) | 0.412 | 6 |" in markdown
    unprofiled = StageResult(0, "eager", [], {}, 28, 1.0, 0.03, 0.05, 0.36, 10.0, 0.09, 10.2, None)
    assert "largest glue kernels" not in BenchmarkReport(meta={}, rows=[unprofiled]).markdown()
