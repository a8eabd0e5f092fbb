"""Input images in, output images out: everything that touches untrusted image bytes.

Decoding is defensive, in this order: a short list of formats (no EPS/PSD/... plugins), the pixel
count read from the header and capped *before* any pixel is decoded (Pillow's own
DecompressionBombWarning is an error in this process as well), a minimum side, a full decode that
turns truncated or corrupt files into a 422, then normalisation: EXIF orientation applied,
animations reduced to their first frame (reported in the response's warnings), ICC profiles
converted to sRGB, alpha composited over white, palette/CMYK/16-bit/float/greyscale turned into
8-bit RGB.
"""

from __future__ import annotations

import binascii
import functools
import io
import logging
import re
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import parallel_png, plain_png
from .errors import APIError, invalid

log = logging.getLogger(__name__)

# Process-wide: a server never wants to decode a decompression bomb, whichever code path opens it.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.IGNORECASE)


@dataclass
class DecodedImage:
    image: Image.Image  # 8-bit RGB, upright
    source_format: str
    source_mode: str
    source_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)  # what normalisation did, for the response's warnings


def set_pillow_pixel_limit(max_pixels: int) -> None:
    """Make Pillow's own bomb check as tight as ours (process-wide; the warning is already an error)."""
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)


def bytes_from_text(text: str, field_name: str = "image") -> bytes:
    """The bytes of a base64 string or a data: URL."""
    text = text.strip()
    scheme = text[:8].lower()  # the head only: lowering a 1 MP picture's 2.8 MB of text costs milliseconds
    if scheme.startswith(("http://", "https://", "file:", "ftp://")):
        raise invalid(field_name, "URLs are not fetched; send the image as base64, a data: URL or a multipart file")
    if scheme.startswith("data:"):
        match = _DATA_URL.match(text)
        if not match or not match.group("b64"):
            raise invalid(field_name, "a data: URL must look like data:image/png;base64,<base64 data>")
        text = text[match.end() :]
    if not text:
        raise invalid(field_name, "is empty")
    try:
        return _b64decode(text)
    except (binascii.Error, ValueError) as error:
        # Line-wrapped base64 (MIME, `base64` without -w0) carries whitespace: strip it and try again.
        # Only then, since stripping a 1 MP picture's 2.8 MB of text costs 28 ms, as much as decoding it.
        compact = "".join(text.split())
        if compact == text:
            raise invalid(field_name, f"not valid base64 ({error})") from None
    if not compact:
        raise invalid(field_name, "is empty")
    try:
        return _b64decode(compact)
    except (binascii.Error, ValueError) as error:
        raise invalid(field_name, f"not valid base64 ({error})") from None


_URL_SAFE = bytes.maketrans(b"-_", b"+/")


def _import_pybase64():
    """pybase64 (requirements.txt: SIMD base64) where installed; the standard library otherwise. On the
    2-core development machine, a 1 MP PNG's 2.8 MB of base64 decodes in 0.17 ms with it, 8-11 ms in
    binascii's strict mode, 13-21 ms through base64.b64decode(validate=True) (which checks the text
    with a regular expression first); a 2-MB output encodes in 0.06 ms against 6."""
    try:
        import pybase64
    except ImportError:
        return None
    return pybase64


_PYBASE64 = _import_pybase64()


def _decode_strict(data: str | bytes) -> bytes:
    """Decoded base64, validated as it is decoded (both decoders raise binascii.Error)."""
    if _PYBASE64 is not None:
        return _PYBASE64.b64decode(data, validate=True)
    return binascii.a2b_base64(data, strict_mode=True)


def base64_text(blob: bytes) -> str:
    """An encoded image as the base64 text of a JSON response."""
    if _PYBASE64 is not None:
        return _PYBASE64.b64encode_as_string(blob)
    return binascii.b2a_base64(blob, newline=False).decode("ascii")


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe alphabet, padding optional; raises binascii.Error (or ValueError, for
    text that is not ASCII) on anything else."""
    data: str | bytes = text  # both decoders read an ASCII str in place (a non-ASCII one raises ValueError)
    if "-" in text or "_" in text:
        data = text.encode("ascii").translate(_URL_SAFE)
    if len(data) % 4:
        data += ("=" if isinstance(data, str) else b"=") * (-len(data) % 4)
    return _decode_strict(data)


def decode_image(data: bytes, max_pixels: int, min_side: int, field_name: str = "image") -> DecodedImage:
    if not data:
        raise invalid(field_name, "is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except UnidentifiedImageError:
        raise invalid(field_name, f"not a recognised image; send one of: {', '.join(INPUT_FORMATS)}", "invalid_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(field_name, None, max_pixels) from None
    except Exception as error:  # noqa: BLE001 - any plugin failure on untrusted bytes is the input's fault
        raise invalid(field_name, f"unreadable image header ({type(error).__name__}: {error})", "invalid_image") from None

    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(field_name, (width, height), max_pixels)
    if min(width, height) < min_side:
        raise invalid(field_name, f"{width}x{height} is too small; each side must be at least {min_side} pixels", "invalid_image")

    plain = plain_png.decode(data, image, fast_png_codec())
    if plain is not None:
        return DecodedImage(plain, "PNG", "RGB", (width, height))
    decoded = DecodedImage(image, image.format or "?", image.mode, (width, height))
    try:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            image.seek(0)
            decoded.notes.append(f"{field_name}: animated {image.format} with {frames} frames; the first frame was used")
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(field_name, (width, height), max_pixels) from None
    except Exception as error:  # noqa: BLE001 - truncated data, bad chunks, codec errors
        raise invalid(field_name, f"truncated or corrupt {image.format} data ({type(error).__name__}: {error})", "invalid_image") from None

    orientation = _exif_orientation(image)
    if orientation not in (None, 1):
        try:
            image = ImageOps.exif_transpose(image)
            decoded.notes.append(f"{field_name}: rotated upright following its EXIF orientation ({orientation})")
        except Exception:  # noqa: BLE001 - broken EXIF is not worth refusing the picture for
            decoded.notes.append(f"{field_name}: unreadable EXIF orientation ignored")
    had_alpha = _has_alpha(image)
    try:
        decoded.image = to_rgb(image)
    except Exception as error:  # noqa: BLE001
        raise invalid(field_name, f"cannot convert colour mode {image.mode} to RGB ({error})", "invalid_image") from None
    if decoded.source_mode != "RGB":
        decoded.notes.append(
            f"{field_name}: colour mode {decoded.source_mode} converted to 8-bit RGB"
            + (", alpha composited over white" if had_alpha else "")
        )
    return decoded


def _too_large(field_name: str, size: tuple[int, int] | None, max_pixels: int) -> APIError:
    what = f"{size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP)" if size else "the declared size"
    return APIError(
        422,
        "image_too_large",
        f"{field_name}: {what} is over the {max_pixels / 1e6:.1f} MP input limit (serve --max-input-pixels)",
        field=field_name,
    )


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def _exif_orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    image = _to_srgb(image)
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            pixels = pixels / 257.0
        elif mode == "F" and pixels.size and np.nanmax(pixels) <= 1.0:
            pixels = pixels * 255.0
        elif pixels.size and np.nanmax(pixels) > 255:
            pixels = pixels / (65535.0 if np.nanmax(pixels) <= 65535 else float(np.nanmax(pixels))) * 255.0
        image = Image.fromarray(np.nan_to_num(pixels).clip(0, 255).astype(np.uint8))  # 2-D uint8: mode L
        mode = "L"
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_srgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return image
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=output_mode)
    except Exception:  # noqa: BLE001 - a broken or unsupported profile: use the pixels as they are
        return image


# PNG through libpng with zlib-ng (imagecodecs), level 1, run-length strategy, "up" row filter (the
# settings OpenCV uses for fast PNG). Chosen by benchmarks/output_encoding.py
# (benchmarks/results/output-encoding/): on a 1 MP picture it encodes noise 6x and a natural picture
# 2.6x faster than Pillow at zlib level 1, for files within 10% of the size. The encode is on the
# response's critical path (it runs after the edit, off the GPU worker); the bytes travel once. On
# an H100 host one core still took 39-80 ms per 1 MP picture (2026-12-06), so where there are several
# cores the same settings run deflate in stripes on threads (service/parallel_png.py).
PNG_LEVEL = 1
# A picture that deflate cannot shrink (noise, film grain) is stored instead (level 0): on a 1 MP
# noise picture level 1 took 20 ms for a file no smaller than level 0's, which took 2.7 ms
# (development CPU). A sample of row pairs, "up"-filtered as libpng filters them, tells which
# (1.5 ms); a natural picture compressed to 0.48 at level 1 and keeps it.
STORE_ABOVE_RATIO = 0.97
PROBE_EVERY_ROWS = 32


@functools.cache
def fast_png_codec():
    """imagecodecs, or None where it cannot be imported (a pinned requirement, but a machine set up
    by hand may lack it: the H100 run of 2026-12-06 did): then Pillow encodes, slower, and a
    response is never lost to it."""
    try:
        import imagecodecs
    except ImportError as error:
        log.warning("PNG output: imagecodecs is not importable (%s); Pillow encodes PNGs instead, 2.6-6x slower", error)
        return None
    return imagecodecs


def encode_png(pixels: np.ndarray) -> bytes:
    """Stored (level 0) through libpng where deflate would not shrink the picture; deflated on
    several cores where the machine has them (service/parallel_png.py; 1.2-1.4x faster than one core
    on two, which is all it has been measured on);
    else libpng through imagecodecs, or Pillow where imagecodecs is missing."""
    codecs = fast_png_codec()
    level = 0 if incompressible(pixels) else PNG_LEVEL
    if level > 0 and parallel_png.threads_available() > 1:
        return parallel_png.encode_png(pixels, level=level)
    if codecs is None:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()
    return codecs.png_encode(pixels, level=level, strategy=codecs.PNG.STRATEGY.RLE, filter=codecs.PNG.FILTER.UP)


def incompressible(pixels: np.ndarray) -> bool:
    """Whether level 1 would shrink this picture by less than 3%, judged on every 32nd row's
    difference from the row above (the "up" filter's output; wraps as libpng's does)."""
    if pixels.shape[0] < 2:
        return False
    sample = (pixels[1::PROBE_EVERY_ROWS] - pixels[:-1:PROBE_EVERY_ROWS]).tobytes()  # uint8: wraps like the filter
    return len(zlib.compress(sample, 1)) > STORE_ABOVE_RATIO * len(sample)


def encode_image(image: Image.Image, output_format: str, quality: int = 90) -> bytes:
    if output_format == "png":
        return encode_png(np.asarray(image.convert("RGB") if image.mode != "RGB" else image))
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:  # pragma: no cover - schemas restrict the choice
        raise ValueError(f"unknown output format {output_format}")
    return buffer.getvalue()
