"""The VAE's pixels as pictures: what diffusers' `VaeImageProcessor.postprocess(output_type="pil")`
does, with its conversion to 8 bits on the device that holds the pixels.

diffusers copies the [0, 1] image to the host as float32 (12 MB for 1024x1024) and scales, rounds
and casts it there with numpy: three passes over 3 M values on one core, 10-15 ms on the 2-core
development machine and more on the GPU hosts measured so far (their single core is 1.2-1.5x
slower: benchmarks/results/nvidia-h200-2026-12-06). On the GPU the same arithmetic takes
microseconds and the copy is the 3 MB of uint8. The values are the same bit for bit: float32 times
255, rounded half to even, cast to uint8, is the same IEEE arithmetic on either side
(tests/test_pictures.py compares them).
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image


def pictures_from_pixels(processor: VaeImageProcessor, pixels: torch.Tensor) -> list[Image.Image]:
    """`processor.postprocess(pixels, output_type="pil")` for RGB pixels (batch, 3, height, width)."""
    unit = processor.postprocess(pixels, output_type="pt")  # denormalized to [0, 1] where the pixels are, as diffusers does
    rows = unit.float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(row) for row in rows]
