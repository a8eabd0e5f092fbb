"""benchmarks/memory_tiers.py end to end on the CPU with the tiny model, as the lead checks it before
spending GPU time: every job runs in its own (spawned) process and the three outputs are written.
One row runs the default full stack (compiled: the small tier, the one issue 23 is about); the
others use the -eager row option, since each compiled row compiles again in its own process (tens of
seconds on two cores), and the tiny tier shows a rule switching compile off with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_tiers_benchmark_runs_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "benchmarks.memory_tiers", "--model", "tiny", "--device", "cpu", "--out", str(out)]
    command += ["--work-dir", str(work), "--size", "64", "--steps", "1", "--repeats", "1", "--warmup", "0"]
    command += ["--rows", "large-eager,medium-eager,small,small-cpu-text-eager,tiny"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {path.name for path in out.iterdir()} == {"memory_tiers.json", "memory_tiers.md", "memory_tiers.png"}
    assert not work.exists(), "the checkpoints are removed unless --keep-work-dir"
    report = json.loads((out / "memory_tiers.json").read_text())
    tiers = report["tiers"]
    assert list(tiers) == ["large-eager", "medium-eager", "small", "small-cpu-text-eager", "tiny"]
    for row, result in tiers.items():
        assert "error" not in result, (row, result)
        assert result["compile"] is (row == "small") and result["median_step_ms"] > 0 and result["median_edit_s"] > 0
        assert all(phase["gpu"] == "cpu: not measured" for phase in result["memory"].values())
        assert result["cuda_graphs"] is False and "needs a CUDA GPU" in result["skipped_stages"]["cuda_graphs"]
        assert "fuse_qkv" in result["active_stages"], row  # the full stack, FP8 weights from load included
    small = tiers["small"]
    assert small["cold_first_edit_s"] > small["median_edit_s"] and small["cold_compile_s"] > 0
    assert small["estimated_peak_gib"] > small["plan"]["estimated_peak_gib_at_1024"], "compile's allowance is in the estimate"
    assert tiers["medium-eager"]["cold_compile_s"] is None and tiers["medium-eager"]["cold_first_edit_s"] is None  # --warmup 0
    assert "swap_tensors" in tiers["tiny"]["skipped_stages"]["compile"] and tiers["tiny"]["cold_compile_s"] is None
    assert small["knobs"]["text_encoders"] == "offloaded" and tiers["small-cpu-text-eager"]["knobs"]["text_encoders"] == "cpu"
    assert tiers["tiny"]["knobs"]["transformer_offload"] and tiers["medium-eager"]["knobs"]["transformer_fp8"] == "weight_only"
    for row in ("small-cpu-text-eager", "tiny"):  # the offload paths compute what the resident medium tier computes
        assert tiers[row]["max_pixel_difference"]["medium"] <= 1, row
    assert small["max_pixel_difference"]["medium"] <= 4  # compiled: fp32 sums reordered (tests/test_stages.py's tolerance)
    assert [load["how"] for load in report["loads"].values()] == list(report["loads"])
    assert all("error" not in load and load["load_s"] > 0 for load in report["loads"].values())
    assert "cpu: not measured" in (out / "memory_tiers.md").read_text()
