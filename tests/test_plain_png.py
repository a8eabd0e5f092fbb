"""service/plain_png.py: the plainest PNG inputs take libpng's faster decode and give the pixels
Pillow's path gives; every other PNG, and every corrupt one, still goes Pillow's way."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service import plain_png
from service.errors import APIError
from service.images import decode_image, fast_png_codec

MAX_PIXELS, MIN_SIDE = 4_000_000, 16


def _pixels(height: int = 96, width: int = 80) -> np.ndarray:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([(x * 3) % 256, (y * 2) % 256, (x + y) % 256], axis=-1)
    return np.where(rng.random((height, width, 1)) < 0.1, rng.integers(0, 256, (height, width, 3)), smooth).astype(np.uint8)


def _png(pixels: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _through_pillow(data: bytes) -> np.ndarray:
    """What decode_image gives when the fast path is not taken."""
    image = Image.open(io.BytesIO(data))
    assert plain_png.decode(data, image, None) is None
    return np.asarray(image.convert("RGB"))


def test_a_plain_rgb_png_takes_libpng_and_gives_pillows_pixels():
    codecs = pytest.importorskip("imagecodecs")
    pixels = _pixels()
    for data in (_png(pixels), _png(pixels, optimize=True), _png(pixels, compress_level=0)):
        assert plain_png.is_plain(data)
        fast = plain_png.decode(data, Image.open(io.BytesIO(data)), codecs)
        assert fast is not None and fast.mode == "RGB"
        assert np.array_equal(np.asarray(fast), pixels) and np.array_equal(np.asarray(fast), _through_pillow(data))
        decoded = decode_image(data, MAX_PIXELS, MIN_SIDE)
        assert decoded.source_format == "PNG" and decoded.notes == [] and np.array_equal(np.asarray(decoded.image), pixels)


def _with_chunk(kind: bytes) -> bytes:
    """An RGB PNG carrying `kind`, written the way Pillow writes it."""
    pixels = _pixels()
    if kind == b"acTL":  # an animation: two frames
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", save_all=True, append_images=[Image.fromarray(255 - pixels)])
        return buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    save = {b"iCCP": {"icc_profile": b"\x00" * 132}, b"tRNS": {"transparency": (0, 0, 0)}, b"eXIf": {"exif": exif.tobytes()}}[kind]
    return _png(pixels, **save)


@pytest.mark.parametrize("kind", sorted(plain_png.CHUNKS_FOR_PILLOW))
def test_chunks_that_change_pillows_result_keep_pillows_path(kind):
    data = _with_chunk(kind)
    assert kind in data and not plain_png.is_plain(data)
    assert plain_png.decode(data, Image.open(io.BytesIO(data)), fast_png_codec()) is None


def _insert_after_header(data: bytes, kind: bytes, body: bytes) -> bytes:
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    end_of_ihdr = 8 + 8 + 13 + 4
    return data[:end_of_ihdr] + chunk + data[end_of_ihdr:]


def test_harmless_chunks_and_other_modes():
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "a camera")
    assert plain_png.is_plain(_png(_pixels(), pnginfo=info))  # text chunks change nothing
    codecs = fast_png_codec()
    if codecs is not None:  # gamma and sRGB intents: neither Pillow's path nor libpng's applies them
        for kind, body in ((b"gAMA", struct.pack(">I", 45455)), (b"sRGB", b"\x00"), (b"cHRM", bytes(32))):
            data = _insert_after_header(_png(_pixels()), kind, body)
            fast = plain_png.decode(data, Image.open(io.BytesIO(data)), codecs)
            assert fast is not None and np.array_equal(np.asarray(fast), _through_pillow(data)), kind
    grey = _png(_pixels()[..., 0])
    rgba = np.concatenate([_pixels(), np.full((96, 80, 1), 255, np.uint8)], axis=-1)
    for data in (grey, _png(rgba)):  # Pillow's mode is not RGB: its path converts and notes it
        assert plain_png.decode(data, Image.open(io.BytesIO(data)), codecs) is None


def test_corrupt_or_truncated_pngs_get_pillows_error():
    data = _png(_pixels())
    truncated = data[: len(data) // 2]
    assert not plain_png.is_plain(truncated) and not plain_png.is_plain(b"not a png at all")
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0xFF  # inside the image data: the chunk walk still adds up, libpng refuses it
    for bad in (truncated, bytes(broken)):
        with pytest.raises(APIError) as refused:
            decode_image(bad, MAX_PIXELS, MIN_SIDE)
        assert refused.value.status_code == 422 and "corrupt" in refused.value.detail
