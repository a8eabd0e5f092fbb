"""Prequantized checkpoints: save, load, same output; what the loader quantizes while reading; the
GPU's row-wise format round trip (on the CPU, with torchao's hardware check lifted for the test);
refusals; the `quantize` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline

from engine.checkpoints import MANIFEST, check_usable, save_prequantized
from engine.engine import KontextEngine
from engine.loading import ModelLoadError, quantized_components
from engine.memory_plan import get_tier
from engine.model_builders import build_tiny_pipeline
from engine.requests import EditRequest
from stages.config import OptimizationConfig
from stages.environment import Environment, GpuInfo
from stages.low_precision import is_quantized_linear
from stages.tensors import is_quantized, leaf_tensors
from stages.transformer_fp8 import format_of, weight_config

ROOT = Path(__file__).resolve().parents[1]
REQUEST = EditRequest(prompt="make the sky red", width=128, height=128, steps=3, seed=9)


def _tensors(module: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    return {name: list(leaf_tensors(value)) for name, value in module.state_dict().items()}


def _identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = _tensors(a), _tensors(b)
    return left.keys() == right.keys() and all(
        len(left[k]) == len(right[k]) and all(torch.equal(x, y) for x, y in zip(left[k], right[k])) for k in left
    )


def _pixels(engine: KontextEngine) -> np.ndarray:
    return np.asarray(engine.edit(REQUEST).images[0]).astype(int)


@pytest.fixture(scope="module")
def fp8_engine() -> KontextEngine:
    return KontextEngine.load("tiny", "cpu", OptimizationConfig(**get_tier("medium").changes))


def test_prequantized_round_trip_gives_the_same_weights_and_pixels(tmp_path, fp8_engine):
    manifest = save_prequantized(fp8_engine.loaded.pipe, tmp_path / "ckpt", source="tiny", knobs={"transformer_fp8": "weight_only"})
    directory = tmp_path / "ckpt"
    assert manifest["format"] == "weight_only" and manifest["versions"]["torchao"] and (directory / MANIFEST).is_file()
    weights = [path.suffix for path in directory.rglob("*") if path.suffix in (".safetensors", ".bin", ".pt", ".pkl")]
    assert weights and set(weights) == {".safetensors"}, "safetensors only: nothing to unpickle"
    assert quantized_components(directory) == {"transformer", "text_encoder_2"}

    loaded = KontextEngine.load(str(directory), "cpu")  # no knobs asked: the checkpoint decides
    assert loaded.loaded.prequantized == {"transformer", "text_encoder_2"}
    assert loaded.default_config.transformer_fp8 == "weight_only" and loaded.default_config.t5_fp8
    assert any("prequantized" in note for note in loaded.model_info["load_notes"])
    assert _identical(loaded.loaded.pipe.transformer, fp8_engine.loaded.pipe.transformer)
    assert _identical(loaded.loaded.pipe.text_encoder_2, fp8_engine.loaded.pipe.text_encoder_2)
    # The weights are bit for bit the same; the CPU GEMMs may sum in another order when a loaded
    # buffer is aligned differently (about 1e-6), so the 8-bit pixels may differ by one level.
    assert np.abs(_pixels(loaded) - _pixels(fp8_engine)).max() <= 1


def test_a_bf16_checkpoint_is_quantized_while_it_is_read(tmp_path, tiny_engine, fp8_engine):
    tiny_engine.loaded.pipe.save_pretrained(tmp_path)
    engine = KontextEngine.load(str(tmp_path), "cpu", OptimizationConfig(**get_tier("small").changes))
    assert engine.loaded.prequantized == frozenset()
    assert any("as loaded" in note for note in engine.model_info["load_notes"]), "quantized by the loader, not in place afterwards"
    transformer = engine.loaded.pipe.transformer
    quantized = {
        name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear) and is_quantized(module.weight)
    }
    assert quantized == {name for name, module in transformer.named_modules() if is_quantized_linear(module, name)}
    assert _identical(transformer, fp8_engine.loaded.pipe.transformer), "reading and quantizing Linear by Linear = quantizing in place"
    assert np.abs(_pixels(engine) - _pixels(fp8_engine)).max() <= 1


def test_the_rowwise_gpu_format_round_trips(tmp_path, monkeypatch):
    """The format FP8 GEMMs use: torchao refuses to create it without an sm89+ GPU, so this test lifts
    that check; the tensors are the ones a GPU makes, and torch runs their GEMMs on the CPU too."""
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import quantize_

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    pipe = build_tiny_pipeline(dtype=torch.bfloat16)
    quantize_(pipe.transformer, weight_config("rowwise"), filter_fn=is_quantized_linear)
    save_prequantized(pipe, tmp_path, source="tiny", knobs={"transformer_fp8": "rowwise"})
    loaded = FluxKontextPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, use_safetensors=True)
    assert format_of(loaded.transformer) == "rowwise" and _identical(loaded.transformer, pipe.transformer)
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 64, 64, generator=generator).bfloat16(),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=generator).bfloat16(),
        pooled_projections=torch.randn(1, 32, generator=generator).bfloat16(),
        timestep=torch.tensor([0.5]).bfloat16(),
        guidance=torch.tensor([2.5]).bfloat16(),
        img_ids=torch.zeros(64, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )
    with torch.no_grad():
        assert torch.equal(loaded.transformer(**inputs)[0], pipe.transformer(**inputs)[0])

    cpu = Environment("3.11", "2.x", None, "cpu", None, {"torchao": "0.18.0"})
    ada = Environment("3.11", "2.x", "13.0", "cuda:0", GpuInfo(0, "RTX 4090", (8, 9), 24 * 2**30, 23 * 2**30), {"torchao": "0.18.0"})
    ampere = Environment("3.11", "2.x", "13.0", "cuda:0", GpuInfo(0, "RTX 3090", (8, 6), 24 * 2**30, 23 * 2**30), {"torchao": "0.18.0"})
    assert check_usable(str(tmp_path), ada) == []
    for machine in (cpu, ampere):
        with pytest.raises(ModelLoadError, match="8.9"):
            check_usable(str(tmp_path), machine)


def test_a_checkpoint_written_with_other_versions_is_warned_about(tmp_path, fp8_engine):
    save_prequantized(fp8_engine.loaded.pipe, tmp_path, source="tiny", knobs={})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["versions"]["torchao"] = "0.0.1"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    cpu = Environment("3.11", "2.x", None, "cpu", None, {"torchao": "0.18.0"})
    [warning] = check_usable(str(tmp_path), cpu)
    assert "torchao 0.0.1" in warning


def test_quantize_command_writes_a_checkpoint_and_refuses_to_overwrite(tmp_path):
    from cli.commands import cmd_quantize
    from cli.options import build_parser

    out = tmp_path / "fp8"
    command = [sys.executable, str(ROOT / "flux_kontext_optimized.py"), "quantize", "--model", "tiny", "--t5-fp8", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["format"] == "weight_only" and summary["components"]["text_encoder_2"] == "fp8 weight_only"
    assert quantized_components(out) == {"transformer", "text_encoder_2"}
    with pytest.raises(ValueError, match="not empty"):
        cmd_quantize(build_parser().parse_args(["quantize", "--model", "tiny", "--out", str(out)]))
    with pytest.raises(ValueError, match="already a prequantized checkpoint"):
        cmd_quantize(build_parser().parse_args(["quantize", "--model", str(out), "--out", str(tmp_path / "other")]))
