"""engine/pictures.py: the pictures equal diffusers' postprocess to PIL, bit for bit, for the VAE's
dtypes, values outside [-1, 1] and values that land exactly halfway between two 8-bit levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

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


class _StopAtLatents(Exception):
    pass


def step_three_output(pipe, image, auto_resize: bool) -> torch.Tensor:
    """The image tensor that FluxKontextPipeline's step 3 hands to prepare_latents for `image`."""
    seen = []

    def prepare_latents(image, *args, **kwargs):
        seen.append(image)
        raise _StopAtLatents

    pipe.prepare_latents = prepare_latents
    try:
        with pytest.raises(_StopAtLatents), torch.no_grad():
            pipe(image=image, prompt="a", num_inference_steps=1, output_type="latent", _auto_resize=auto_resize)
    finally:
        del pipe.prepare_latents  # the class's method again
    return seen[0]


@pytest.mark.parametrize("auto_resize", [True, False])
@pytest.mark.parametrize("size", [(1000, 700), (333, 517), (1024, 1024), (1568, 672)])
def test_conditioning_pixels_reach_the_vae_as_diffusers_preprocess_makes_them(tiny_engine, auto_resize, size):
    """Step 3 of the pipeline on our device tensor equals step 3 on the picture: the same values bit
    for bit, the same size (resized as the pipeline would, preferred resolution or not), the same
    strides, and every 8-bit level appears."""
    from engine.pictures import conditioning_pixels

    pipe = tiny_engine.loaded.pipe
    width, height = size
    ramp = np.arange(width * height * 3, dtype=np.int64).reshape(height, width, 3) * 7 % 256
    picture = Image.fromarray(ramp.astype(np.uint8))
    ours = conditioning_pixels(pipe.image_processor, picture, pipe.vae_scale_factor * 2, auto_resize, "cpu")
    assert ours.dtype == torch.float32 and float(ours.min()) >= 0 and float(ours.max()) <= 1
    from_picture = step_three_output(pipe, picture, auto_resize)
    from_ours = step_three_output(pipe, ours, auto_resize)
    assert from_picture.shape == from_ours.shape and from_picture.stride() == from_ours.stride()
    assert torch.equal(from_picture, from_ours)
    assert torch.unique(from_ours).numel() == 256


def test_the_tiny_edit_is_unchanged_by_the_device_upload(tiny_engine, photo):
    """The whole edit, conditioning picture handed to diffusers as a PIL (as before) or as our
    tensor: the same picture out."""
    from engine import engine as engine_module
    from engine.requests import EditRequest

    request = EditRequest(prompt="make it red", image=photo, steps=2, seed=3)
    ours = tiny_engine.edit(request).images[0]
    original = engine_module.conditioning_pixels
    engine_module.conditioning_pixels = lambda processor, picture, *args: picture  # diffusers' own preprocess
    try:
        theirs = tiny_engine.edit(request).images[0]
    finally:
        engine_module.conditioning_pixels = original
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
