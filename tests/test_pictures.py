"""engine/pictures.py: the pictures equal diffusers' postprocess to PIL, bit for bit, for the VAE's
dtypes, values outside [-1, 1] and values that land exactly halfway between two 8-bit levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from engine.pictures import pictures_from_pixels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_pictures_are_diffusers_pictures_bit_for_bit(dtype):
    processor = VaeImageProcessor(vae_scale_factor=16)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.randn(2, 3, 48, 64, generator=generator) * 0.7).to(dtype)
    # every 8-bit level and the halfway points between them (k + 0.5) / 255, as pixels in [-1, 1]
    levels = torch.arange(0, 511, dtype=torch.float32) / 2 / 255 * 2 - 1
    pixels[0].view(-1)[: levels.numel()] = levels.to(dtype)
    pixels[1, 0, 0, :4] = torch.tensor([-3.0, 3.0, -1.0, 1.0], dtype=dtype)  # clamped
    ours = pictures_from_pixels(processor, pixels)
    theirs = processor.postprocess(pixels, output_type="pil")
    assert len(ours) == len(theirs) == 2
    for mine, reference in zip(ours, theirs):
        assert mine.mode == reference.mode == "RGB" and mine.size == reference.size == (64, 48)
        assert np.array_equal(np.asarray(mine), np.asarray(reference))
