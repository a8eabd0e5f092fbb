"""benchmarks/gil_handoff.py runs on the CPU and writes its table (its numbers are the machine's; here
only that every interval got a row and the switch interval is restored)."""

from __future__ import annotations

import json
import sys

from benchmarks import gil_handoff


def test_it_writes_a_row_per_interval_and_restores_the_interval(tmp_path):
    before = sys.getswitchinterval()
    assert gil_handoff.main(["--out", str(tmp_path), "--calls", "40", "--repeats", "1"]) == 0
    result = json.loads((tmp_path / "gil_handoff.json").read_text())
    assert [row["interval_ms"] for row in result["rows"]] == [interval * 1e3 for interval in gil_handoff.INTERVALS_S]
    assert all(row["calls_beside_ms"] > 0 for row in result["rows"])
    assert "| 0.2 |" in (tmp_path / "gil_handoff.md").read_text()
    assert sys.getswitchinterval() == before
