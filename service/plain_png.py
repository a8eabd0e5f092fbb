"""The plainest PNG inputs, decoded through libpng with zlib-ng (imagecodecs) instead of Pillow: a
1 MP picture in 16.2-18.5 ms instead of 21.2-24.5 ms on the development CPU
(benchmarks/output_encoding.py), off every such edit's served time (issue 26: the input's decode
was 21-34 ms of an edit's server time on an H100 host).

Plain means 8-bit RGB without a colour profile, transparency, animation or EXIF: what Pillow's
path (service/images.py) would hand on unchanged. Pillow has already read the header and checked the
size; anything else, and anything libpng refuses, goes Pillow's way, which also words the errors.
"""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image

from .parallel_png import PNG_SIGNATURE

# Chunks after which Pillow's path changes the pixels or adds a note: an ICC profile (converted to
# sRGB), transparency (composited over white), animation (first frame), EXIF (orientation).
CHUNKS_FOR_PILLOW = frozenset({b"iCCP", b"tRNS", b"acTL", b"eXIf"})


def is_plain(data: bytes) -> bool:
    """Whether the file's chunks are all ones Pillow's path would ignore (walked without reading
    their data; a file whose chunks do not add up is not plain, and Pillow reports it)."""
    if not data.startswith(PNG_SIGNATURE):
        return False
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind in CHUNKS_FOR_PILLOW:
            return False
        if kind == b"IEND":
            return True
        position += 12 + length
    return False


def decode(data: bytes, header: Image.Image, codecs) -> Image.Image | None:
    """The picture as 8-bit RGB, or None where Pillow should decode it (`header`: Pillow's opened,
    not yet loaded image; `codecs`: imagecodecs, or None where it is missing)."""
    if codecs is None or header.format != "PNG" or header.mode != "RGB" or not is_plain(data):
        return None
    try:
        pixels = codecs.png_decode(data)
    except Exception:  # noqa: BLE001 - corrupt data: Pillow decodes it again and says what is wrong
        return None
    if pixels.dtype != np.uint8 or pixels.shape != (header.height, header.width, 3):  # 16-bit RGB reads as mode RGB in Pillow
        return None
    return Image.fromarray(pixels)
