"""benchmarks/memory_tiers.py end to end on the CPU with the tiny model, as the lead checks it before
spending GPU time: every job runs in its own process and the three outputs are written."""

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
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {path.name for path in out.iterdir()} == {"memory_tiers.json", "memory_tiers.md", "memory_tiers.png"}
    assert not work.exists(), "the checkpoints are removed unless --keep-work-dir"
    report = json.loads((out / "memory_tiers.json").read_text())
    tiers = report["tiers"]
    assert list(tiers) == ["large", "medium", "small", "small-cpu-text", "tiny"]
    for row, result in tiers.items():
        assert "error" not in result, (row, result)
        assert result["compile"] is False and result["median_step_ms"] > 0 and result["median_edit_s"] > 0
        assert all(phase["gpu"] == "cpu: not measured" for phase in result["memory"].values())
    assert tiers["small"]["knobs"]["text_encoders"] == "offloaded" and tiers["small-cpu-text"]["knobs"]["text_encoders"] == "cpu"
    assert tiers["tiny"]["knobs"]["transformer_offload"] and tiers["medium"]["knobs"]["transformer_fp8"] == "weight_only"
    for row in ("small", "small-cpu-text", "tiny"):  # the offload paths compute what the resident medium tier computes
        assert tiers[row]["max_pixel_difference"]["medium"] <= 1, row
    assert [load["how"] for load in report["loads"].values()] == list(report["loads"])
    assert all("error" not in load and load["load_s"] > 0 for load in report["loads"].values())
    assert "cpu: not measured" in (out / "memory_tiers.md").read_text()
