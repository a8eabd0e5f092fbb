"""LoRA on the command line (edit --lora NAME[:SCALE], serve --preload-lora) and the LoRA benchmark's
CPU run, which the GPU run must not be the first to exercise."""

from __future__ import annotations

import json

import pytest

from cli.options import build_parser, engine_options_from_args
from engine.requests import LoraChoice
from tests.conftest import LORA_TEST_RANK
from tests.test_cli import run_cli


def test_lora_choices_parse_as_written():
    assert LoraChoice.parse("style") == LoraChoice("style", None)
    assert LoraChoice.parse("style:0.8") == LoraChoice("style", 0.8)
    assert LoraChoice.parse("my.style-v2:-0.5") == LoraChoice("my.style-v2", -0.5)
    with pytest.raises(ValueError, match="NAME:SCALE"):
        LoraChoice.parse("style:strong")


def test_serve_options_become_the_engines_lora_settings(tmp_path):
    args = build_parser().parse_args(
        ["serve", "--lora-dir", str(tmp_path), "--lora-slots", "3", "--lora-max-rank", "32", "--lora-max-mb", "100"]
        + ["--preload-lora", "a", "--preload-lora", "b", "--preload-lora", "a"]
    )
    settings = engine_options_from_args(args).lora
    assert (settings.directory, settings.slots, settings.max_rank, settings.max_bytes) == (str(tmp_path), 3, 32, 100 * 2**20)
    assert settings.preload == ("a", "b") and settings.mode == "slots" and not settings.merges
    assert engine_options_from_args(build_parser().parse_args(["serve", "--lora-mode", "merge"])).lora.merges
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora-mode", "fuse"])
    assert build_parser().parse_args(["edit", "--prompt", "x", "--lora", "a:0.5", "--lora", "b"]).lora == ["a:0.5", "b"]


def test_edit_applies_the_named_adapters(lora_dir, tmp_path):
    common = ["edit", "--prompt", "x", "--seed", "2", "--steps", "2", "--width", "32", "--height", "32", "--lora-dir", str(lora_dir)]
    result = run_cli(
        *common, "--lora", "style:0.5", "--lora", "kohya", "--lora-max-rank", str(LORA_TEST_RANK), "--out", str(tmp_path / "a.png")
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["lora"]["adapters"] == [{"name": "style", "scale": 0.5, "rank": 4}, {"name": "kohya", "scale": 1.0, "rank": 2}]
    assert "lora" in summary["active_stages"]
    refused = run_cli(*common, "--lora", "../style")
    assert refused.returncode == 2 and "not an adapter name" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_the_lora_benchmark_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from benchmarks import lora_bench

    inductor_cache = cache_dir()  # this session's, where test_lora_compile left the same graphs
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)  # restored afterwards
    argv = ["--model", "tiny", "--device", "cpu", "--size", "64", "--steps", "2", "--repeats", "1", "--rank", "4"]
    argv += ["--max-rank", str(LORA_TEST_RANK), "--compile-cache", inductor_cache, "--out", str(tmp_path)]
    assert lora_bench.main(argv) == 0
    report = json.loads((tmp_path / "lora.json").read_text())
    assert report["new_graphs_after_warmup"] == 0 and report["scale_0_is_the_base_bit_for_bit"] is True
    assert set(report["rows"]) == {"none", "one adapter", "two adapters"}
    assert report["rows"]["two adapters"]["median_swap_ms"] > 0 and report["rows"]["none"]["median_swap_ms"] is None
    assert [row["layers"] for row in report["adapters"]] == [39, 39] and "compile" in report["config"]
    assert "| two adapters |" in (tmp_path / "lora.md").read_text()
    assert report["base_after_all_swaps_is_the_first_bit_for_bit"] is True

    merged = tmp_path / "merge"
    assert lora_bench.main(argv[:-1] + [str(merged), "--mode", "merge"]) == 0
    report = json.loads((merged / "lora.json").read_text())
    assert report["mode"] == "merge" and report["new_graphs_after_warmup"] == 0 and report["host_backup_gb"] >= 0
    assert report["rows"]["two adapters"]["median_swap_ms"] > 0 and report["rows"]["none"]["median_restore_ms"] > 0
    assert "merged into the weights" in (merged / "lora.md").read_text()


@pytest.mark.slow
def test_the_lora_fidelity_benchmark_puts_both_modes_next_to_the_reference(tmp_path):
    from benchmarks import lora_fidelity

    assert lora_fidelity.main(["--model", "tiny", "--device", "cpu", "--size", "64", "--rank", "4", "--out", str(tmp_path)]) == 0
    rows = {row["run"]: row for row in json.loads((tmp_path / "lora_fidelity.json").read_text())["rows"]}
    reference = rows["reference: bf16 weights, adapter beside them (slots)"]
    assert reference["image_psnr_db"] is None and reference["lora"]["adapters"][0]["name"] == "fidelity"
    assert rows["merge on bf16 weights"]["lora"]["mode"] == "merge"
    # on a CPU both "FP8" rows run in full precision: the merge is the slots' computation up to rounding
    assert rows["merge on FP8 GEMMs (re-quantized)"]["image_rel_l2"] < 1e-3
    assert rows["FP8 GEMMs without the adapter"]["image_rel_l2"] > 10 * rows["merge on FP8 GEMMs (re-quantized)"]["image_rel_l2"]
