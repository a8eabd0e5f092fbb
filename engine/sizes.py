"""Output sizes: Kontext's 17 preferred resolutions and how a request's size is decided."""

from __future__ import annotations

import math

# diffusers' PREFERRED_KONTEXT_RESOLUTIONS, (width, height), all about one megapixel. Copied, not
# imported: importing diffusers' pipeline module costs seconds (transformers with it) on the HTTP
# side's import path, which otherwise needs neither; tests/test_sizes.py checks they still agree.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104), (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip
KONTEXT_AREA = 1024 * 1024  # the pixel budget the preferred resolutions were chosen for (each within 2% of it)
SIZE_MULTIPLE = 16  # VAE downsampling (8) x latent packing (2)


def closest_kontext_resolution(aspect_ratio: float) -> tuple[int, int]:
    return min(KONTEXT_RESOLUTIONS, key=lambda wh: abs(aspect_ratio - wh[0] / wh[1]))


def parse_aspect_ratio(text: str) -> tuple[int, int]:
    """'1392x752' (a preferred resolution) or '16:9' (the closest preferred resolution)."""
    text = text.strip().lower()
    if "x" in text:
        width, height = (int(part) for part in text.split("x", 1))
        if (width, height) not in KONTEXT_RESOLUTIONS:
            choices = ", ".join(f"{w}x{h}" for w, h in KONTEXT_RESOLUTIONS)
            raise ValueError(f"{text} is not one of Kontext's preferred resolutions: {choices}")
        return width, height
    if ":" in text:
        a, b = (float(part) for part in text.split(":", 1))
        if a <= 0 or b <= 0:
            raise ValueError(f"aspect ratio {text} must have two positive sides")
        return closest_kontext_resolution(a / b)
    raise ValueError(f"aspect ratio {text!r}: write WxH (e.g. 1392x752) or W:H (e.g. 16:9)")


def scale_to_area(width: int, height: int, max_area: int) -> tuple[int, int]:
    """Keep the aspect ratio, fit `max_area` pixels, round down to multiples of 16. At Kontext's own
    budget a preferred resolution stays as it is (four of them are slightly over 1024*1024 pixels,
    and Kontext generates at them, as the warm-up compiles them)."""
    if max_area == KONTEXT_AREA and (width, height) in KONTEXT_RESOLUTIONS:
        return width, height
    scale = math.sqrt(max_area / (width * height))
    return (
        max(SIZE_MULTIPLE, int(width * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE),
        max(SIZE_MULTIPLE, int(height * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE),
    )


def output_size(
    width: int | None,
    height: int | None,
    input_size: tuple[int, int] | None,
    max_area: int,
) -> tuple[int, int]:
    """The (width, height) an edit produces.

    An explicit size wins (rounded down to multiples of 16). Otherwise Kontext's rule: the preferred
    resolution closest to the input image's aspect ratio (square without an input), scaled to the
    model's pixel budget.
    """
    if (width is None) != (height is None):
        raise ValueError("give both width and height, or neither")
    if width is not None:
        return (max(SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE), max(SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE))
    aspect = input_size[0] / input_size[1] if input_size else 1.0
    return scale_to_area(*closest_kontext_resolution(aspect), max_area)


def edit_shape(width: int, height: int, input_size: tuple[int, int] | None, num_images: int, snaps: bool) -> tuple:
    """What decides the shapes the transformer and the VAE see, so the graphs compiled and the CUDA
    graphs recorded for an edit: the output size, the size the input image is conditioned at (its
    tokens join the sequence; diffusers snaps it to the preferred resolution closest to its aspect
    ratio, models without them condition at the output size) and the batch."""
    reference = None
    if input_size is not None:
        reference = closest_kontext_resolution(input_size[0] / input_size[1]) if snaps else (width, height)
        reference = (reference[0] // SIZE_MULTIPLE * SIZE_MULTIPLE, reference[1] // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return (width, height, reference, num_images)
