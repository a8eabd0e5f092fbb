"""The stage benchmark through the engine's own path (tiny model, CPU): table, files, failures, cancel."""

from __future__ import annotations

import json

import pytest

from benchmarks.stage_benchmark import BenchmarkSettings, run_benchmark, write_results


def test_benchmark_writes_every_format_with_cache_and_option_rows(tiny_engine, tmp_path):
    # compile off keeps this quick on a CPU; stage 4 still fuses QKV and halves the steps
    settings = BenchmarkSettings(stages=[0, 4], repeats=1, warmup=0, overrides={"compile": False}, option_rows=[("FP8 attention", {"attention": "fa3_fp8"}), ("no fast GELU", {"fast_gelu": False})])
    report = run_benchmark(tiny_engine, settings)
    assert [row.stage for row in report.rows] == [0, 4]
    stage0, stage4 = report.rows
    assert stage0.steps == 28 and stage4.steps == 14 and stage4.total_s < stage0.total_s
    assert stage0.deviation_rel_l2 == 0.0 and stage0.psnr_db is None and stage4.deviation_rel_l2 > 0
    # both backends are measured, each with a never-skipping and a default-threshold row
    assert [(c.backend, c.threshold) for c in report.cache_rows] == [("para_attn", 1e-9), ("para_attn", 0.12), ("diffusers", 1e-9), ("diffusers", 0.12)]
    assert all(c.skipped == 0 and c.computed == 14 for c in report.cache_rows if c.threshold < 1e-6)
    assert "skipped" in report.option_rows[0].detail and "CUDA" in report.option_rows[0].detail
    assert report.option_rows[1].detail == "fast_gelu off"
    directory = write_results(report, tmp_path)
    assert {p.name for p in directory.iterdir()} == {"stages.json", "stages.csv", "stages.md", "stages.png"}
    json.loads((directory / "stages.json").read_text())  # strict JSON: no Infinity or NaN literals needed
    assert "| 4 |" in (directory / "stages.md").read_text()


def test_a_failing_stage_is_recorded_and_the_others_still_run(tiny_engine, monkeypatch):
    original = tiny_engine.edit

    def edit(request, config=None, **kwargs):
        if config is not None and config.scheduler != "euler":
            raise RuntimeError("simulated kernel failure")
        return original(request, config, **kwargs)

    monkeypatch.setattr(tiny_engine, "edit", edit)
    report = run_benchmark(tiny_engine, BenchmarkSettings(stages=[0, 4], repeats=1, warmup=0, overrides={"compile": False}, cache_rows=False, option_rows=[]))
    assert report.rows[0].error is None and "simulated kernel failure" in report.rows[1].error
    assert "stage 4 FAILED" in report.markdown()


def test_a_progress_callback_can_cancel_the_run(tiny_engine):
    class Stop(Exception):
        pass

    def on_progress(message, fraction):
        raise Stop(message)

    with pytest.raises(Stop):
        run_benchmark(tiny_engine, BenchmarkSettings(stages=[0], repeats=1, warmup=0), on_progress=on_progress)
