"""service/parallel_png.py: PNGs deflated in stripes on threads decode, with any decoder, to the
pixels they encode, in every shape and channel count the service writes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.parallel_png import MIN_STRIPE_BYTES, encode_png, up_filtered


def _picture(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth areas, edges and noise, so that deflate finds runs and matches in some rows, not in others."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = ((x * 255) // max(width - 1, 1) + (y // 7) * 3) % 256
    noisy = rng.integers(0, 256, (height, width))
    base = np.where((y // 16) % 3 == 0, noisy, smooth).astype(np.uint8)
    planes = [np.roll(base, shift, axis=1) for shift in range(channels)]
    return planes[0] if channels == 1 else np.stack(planes, axis=-1)


def _idat(png: bytes) -> bytes:
    position, data = 8, b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        if kind == b"IDAT":
            data += png[position + 8 : position + 8 + length]
        position += 12 + length
    return data


@pytest.mark.parametrize("height, width, channels", [(1, 1, 3), (1, 640, 3), (389, 601, 4), (512, 512, 3), (1001, 333, 1), (1248, 832, 3)])
@pytest.mark.parametrize("level", [0, 1, 6])
def test_every_stripe_count_decodes_to_the_pixels(height, width, channels, level):
    pixels = _picture(height, width, channels, seed=height + width)
    for threads in (1, 2, 3, 8):
        png = encode_png(pixels, level=level, threads=threads)
        decoded = np.asarray(Image.open(io.BytesIO(png)))
        assert decoded.shape == pixels.shape and np.array_equal(decoded, pixels), (threads, level)
        assert zlib.decompress(_idat(png)) == up_filtered(pixels).tobytes()  # one zlib stream, its Adler-32 checked


def test_large_pictures_are_cut_into_stripes_and_cost_little_in_size():
    pixels = _picture(1024, 1024, 3)
    assert up_filtered(pixels).nbytes // MIN_STRIPE_BYTES >= 8  # a 1 MP picture gets all eight threads
    one, eight = encode_png(pixels, threads=1), encode_png(pixels, threads=8)
    assert one != eight  # the stripes change the stream...
    assert len(eight) <= len(one) * 1.01  # ...and add under 1% to the file
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(eight))), pixels)


def test_imagecodecs_reads_it_too():
    imagecodecs = pytest.importorskip("imagecodecs")
    pixels = _picture(700, 900, 3)
    assert np.array_equal(imagecodecs.png_decode(encode_png(pixels, threads=4)), pixels)


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.uint16), np.zeros((4,), np.uint8)],
    ids=["two channels", "16 bit", "1-D"],
)
def test_what_it_cannot_write_is_refused_by_name(pixels):
    with pytest.raises(ValueError, match="uint8 pictures of 1, 3 or 4 channels"):
        encode_png(pixels)


def test_responses_encoded_at_once_share_the_threads_and_each_gets_its_own_picture():
    """The service encodes each response on its own thread (service/edits.py); their stripes share
    one pool of deflate threads."""
    from concurrent.futures import ThreadPoolExecutor

    from service.images import encode_image

    pictures = [_picture(600, 800, 3, seed=seed) for seed in range(4)]
    with ThreadPoolExecutor(max_workers=4) as requests:
        encoded = list(requests.map(lambda pixels: encode_image(Image.fromarray(pixels), "png"), pictures))
    for pixels, png in zip(pictures, encoded):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
