"""Shared fixtures: one tiny-model engine per test session (loading costs seconds, not minutes), and
LoRA adapters made in code for it, with an engine that has them in its library."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels (stages/kernels/) run in Triton's CPU interpreter; it must be chosen
# before the kernels are defined, so before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from patches import triton_interpreter_index

    triton_interpreter_index.apply()

import numpy as np
import pytest
from PIL import Image

from engine.engine import KontextEngine
from engine.lora_settings import LoraSettings
from stages.environment import current_environment

LORA_TEST_RANK = 8  # the tiny engines' slot rank: every test adapter fits


@pytest.fixture(scope="session")
def tiny_engine() -> KontextEngine:
    return KontextEngine.load("tiny", "cpu", max_variants=8)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_engine):
    """Adapters for the tiny model, made with peft: `style` (diffusers layout, rank 4, every attention
    and MLP Linear of the blocks), `kohya` (sd-scripts layout, rank 2, alpha 4: qkv fused in the file)
    and `detail` (diffusers layout, rank 8, attention only)."""
    from benchmarks.lora_adapters import kohya_targets, random_adapter, save_diffusers, save_kohya

    directory = tmp_path_factory.mktemp("loras")
    transformer = tiny_engine.loaded.pipe.transformer
    state, config = random_adapter(transformer, 4, seed=1)
    save_diffusers(directory / "style.safetensors", state, config)
    state, config = random_adapter(transformer, 2, seed=2, targets=kohya_targets(transformer), alpha=4)
    save_kohya(directory / "kohya.safetensors", state, config, transformer)
    attention = [name for name in kohya_targets(transformer) if ".attn." in name]
    state, config = random_adapter(transformer, 8, seed=3, targets=attention)
    save_diffusers(directory / "detail.safetensors", state, config)
    return directory


@pytest.fixture(scope="session")
def lora_engine(tiny_engine, lora_dir) -> KontextEngine:
    """The tiny model (shared with tiny_engine, its own variants) with style and kohya loaded."""
    settings = LoraSettings(directory=str(lora_dir), max_rank=LORA_TEST_RANK, preload=("style", "kohya"))
    return KontextEngine(tiny_engine.loaded, tiny_engine.env, max_variants=8, lora=settings)


@pytest.fixture(scope="session")
def cpu_env():
    return current_environment("cpu")


@pytest.fixture
def photo() -> Image.Image:
    """A non-square RGB picture with structure (fresh per test, so tests cannot share mutations)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:180, 0:240]
    pixels = np.stack([x / 240, y / 180, 0.5 + 0.5 * np.sin(x / 9.0)], axis=-1) * 200 + rng.uniform(0, 55, (180, 240, 3))
    return Image.fromarray(pixels.astype(np.uint8))


def image_distance(a: Image.Image, b: Image.Image) -> tuple[float, float]:
    """(relative L2, max absolute difference in 0..1 units) between two images."""
    x = np.asarray(a, dtype=np.float64) / 255.0
    y = np.asarray(b, dtype=np.float64) / 255.0
    return float(np.linalg.norm(x - y) / np.linalg.norm(y)), float(np.abs(x - y).max())


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
