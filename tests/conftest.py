"""Shared fixtures: one tiny-model engine per test session (loading costs seconds, not minutes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.engine import KontextEngine
from stages.environment import current_environment


@pytest.fixture(scope="session")
def tiny_engine() -> KontextEngine:
    return KontextEngine.load("tiny", "cpu", max_variants=8)


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
