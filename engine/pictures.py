"""Pictures to the VAE's pixels and back, with the float work on the device that runs the VAE.

Out: what diffusers' `VaeImageProcessor.postprocess(output_type="pil")` does, with its conversion to
8 bits on the device that holds the pixels.

diffusers copies the [0, 1] image to the host as float32 (12 MB for 1024x1024) and scales, rounds
and casts it there with numpy: three passes over 3 M values on one core, 10-15 ms on the 2-core
development machine and more on the GPU hosts measured so far (their single core is 1.2-1.5x
slower: benchmarks/results/nvidia-h200-2026-12-06). On the GPU the same arithmetic takes
microseconds and the copy is the 3 MB of uint8. The values are the same bit for bit: float32 times
255, rounded half to even, cast to uint8, is the same IEEE arithmetic on either side
(tests/test_pictures.py compares them).

In: the conditioning picture goes to the device as its 3 MB of uint8, not as the 12 MB of float32
that diffusers' preprocess makes of it on one host core (to float32, / 255, then 2x - 1 and a
min() in torch: 9-15 ms on the development machine). The pipeline still runs its own step 3 on
what it is given; see `conditioning_pixels`.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from .sizes import KONTEXT_RESOLUTIONS


def pictures_from_pixels(processor: VaeImageProcessor, pixels: torch.Tensor) -> list[Image.Image]:
    """`processor.postprocess(pixels, output_type="pil")` for RGB pixels (batch, 3, height, width)."""
    unit = processor.postprocess(pixels, output_type="pt")  # denormalized to [0, 1] where the pixels are, as diffusers does
    rows = unit.float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(row) for row in rows]


def conditioning_pixels(processor: VaeImageProcessor, picture: Image.Image, multiple_of: int, auto_resize: bool, device) -> torch.Tensor:
    """The RGB `picture` as FluxKontextPipeline's step 3 would make it before normalizing: resized as
    the pipeline resizes it, in [0, 1], shape (1, 3, height, width), float32 on `device`.

    Given this tensor, the pipeline's step 3 picks the same size (it already is a preferred
    resolution, or a multiple of `multiple_of` without `auto_resize`), its resizes are nearest at
    the same size (identity), and it normalizes on the device. The values are diffusers' own: each
    8-bit level maps through a table that `processor.pil_to_numpy` computed, so nothing here
    re-derives its arithmetic. The strides are those of diffusers' tensor (channels last, from
    numpy's HWC array), so the VAE's first convolution sees the same layout."""
    height, width = processor.get_default_height_width(picture)
    if auto_resize:  # as the pipeline picks, from the size rounded to the processor's multiple
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    width, height = width // multiple_of * multiple_of, height // multiple_of * multiple_of
    resized = processor.resize(picture, height, width)
    levels = torch.from_numpy(np.array(resized)).to(device)  # the 8-bit picture: a quarter of float32's bytes
    unit = _unit_levels(processor, torch.device(device))[levels.int()]  # (height, width, 3)
    return unit.unsqueeze(0).permute(0, 3, 1, 2)  # NHWC in memory, as numpy_to_pt's transpose leaves it


_UNIT_LEVELS: dict[torch.device, torch.Tensor] = {}


def _unit_levels(processor: VaeImageProcessor, device: torch.device) -> torch.Tensor:
    """The 256 float32 values diffusers' `pil_to_numpy` gives the 8-bit levels, on `device`."""
    if device not in _UNIT_LEVELS:
        ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(1, 256))  # mode L
        _UNIT_LEVELS[device] = torch.from_numpy(processor.pil_to_numpy(ramp).reshape(256)).to(device)
    return _UNIT_LEVELS[device]
