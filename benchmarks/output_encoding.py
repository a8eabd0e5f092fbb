"""Output encoding: how long each PNG encoder takes on a picture of each preferred size, and how large
the file is, on noise (the worst case for deflate, and what random weights give) and on a natural
picture (scikit-learn's china.jpg, scaled up: smoother than a real photo of that size, so between
the two). It chose the service's encoder (service/images.py); JPEG and WebP are listed for scale.
The input side is measured too: the same pictures as a client's PNG, decoded by Pillow and by the
service's decode (service/plain_png.py).

    python -m benchmarks.output_encoding --out /tmp/output-encoding            # a few seconds per size
    python -m benchmarks.output_encoding --sizes 1024x1024 --repeats 5 --out DIR

Writes output_encoding.{json,md} into --out. Every PNG is decoded again and compared with the
pixels it encodes, and every decode with the pixels (a lossless codec that is not lossless is an
error, not a row).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from service import parallel_png
from service.images import decode_image, encode_image

SIZES = ("1024x1024", "1392x752", "752x1392")  # the square default and the widest preferred resolutions
STRIPES = (1, 2, 4, 8)  # service/parallel_png.py: deflate in this many stripes, on up to this many threads


def _pillow_png(level: int):
    def encode(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    return encode


def _imagecodecs_png(level: int, strategy: int | None, filter_: int | None):
    def encode(pixels: np.ndarray) -> bytes:
        import imagecodecs

        return imagecodecs.png_encode(pixels, level=level, strategy=strategy, filter=filter_)

    return encode


def _striped_png(threads: int):
    def encode(pixels: np.ndarray) -> bytes:
        return parallel_png.encode_png(pixels, level=1, threads=threads)

    return encode


def encoders() -> dict:
    """PNG encoders: Pillow's zlib levels, and libpng through imagecodecs with zlib-ng, its
    run-length strategy and a fixed row filter (the settings OpenCV uses for fast PNG)."""
    import imagecodecs

    rle, up, sub, adaptive = imagecodecs.PNG.STRATEGY.RLE, imagecodecs.PNG.FILTER.UP, imagecodecs.PNG.FILTER.SUB, imagecodecs.PNG.FILTER.ALL
    return {
        "pillow zlib 1 (before)": _pillow_png(1),
        "pillow zlib 6": _pillow_png(6),
        "imagecodecs libpng 1, adaptive filter": _imagecodecs_png(1, None, None),
        "imagecodecs libpng 1, rle, adaptive filter": _imagecodecs_png(1, rle, adaptive),
        "imagecodecs libpng 1, rle, sub filter": _imagecodecs_png(1, rle, sub),
        "imagecodecs libpng 1, rle, up filter": _imagecodecs_png(1, rle, up),
        **{f"zlib 1, rle, up filter, {threads} stripes on threads": _striped_png(threads) for threads in STRIPES},
        "service (png)": lambda pixels: encode_image(Image.fromarray(pixels), "png"),
        "service (jpeg 90)": lambda pixels: encode_image(Image.fromarray(pixels), "jpeg", 90),
        "service (webp 90)": lambda pixels: encode_image(Image.fromarray(pixels), "webp", 90),
    }


def pictures(width: int, height: int) -> dict[str, np.ndarray]:
    found = {"noise": np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)}
    try:
        from sklearn.datasets import load_sample_image

        found["natural"] = np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.Resampling.LANCZOS))
    except ImportError:  # scikit-learn comes with requirements-dev.txt
        pass
    return found


def measure(encode, pixels: np.ndarray, repeats: int) -> dict:
    encode(pixels)  # first call: imports, tables
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        blob = encode(pixels)
        seconds.append(time.perf_counter() - started)
    lossless = None
    if blob.startswith(parallel_png.PNG_SIGNATURE):
        lossless = bool(np.array_equal(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")), pixels))
        if not lossless:
            raise AssertionError("a PNG encoder changed the pixels")
    return {"median_ms": round(statistics.median(seconds) * 1e3, 2), "megabytes": round(len(blob) / 2**20, 3), "lossless": lossless}


def decoders() -> dict:
    """The input side: a PNG as a client sends it, decoded to 8-bit RGB by Pillow alone and by the
    service (service/images.py: libpng through imagecodecs for plain RGB PNGs, service/plain_png.py)."""
    return {
        "pillow": lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
        "service (decode_image)": lambda data: np.asarray(decode_image(data, 1 << 26, 16).image),
    }


def measure_decode(decode, pixels: np.ndarray, repeats: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # Pillow's default level, as a client's library writes it
    data = buffer.getvalue()
    if not np.array_equal(decode(data), pixels):
        raise AssertionError("a PNG decoder changed the pixels")
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        decode(data)
        seconds.append(time.perf_counter() - started)
    return {"median_ms": round(statistics.median(seconds) * 1e3, 2), "megabytes": round(len(data) / 2**20, 3)}


def run(sizes: list[str], repeats: int) -> dict:
    rows, decode_rows = [], []
    for size in sizes:
        width, height = (int(side) for side in size.lower().split("x"))
        for picture, pixels in pictures(width, height).items():
            for name, encode in encoders().items():
                rows.append({"size": size, "picture": picture, "encoder": name, **measure(encode, pixels, repeats)})
            for name, decode in decoders().items():
                decode_rows.append({"size": size, "picture": picture, "decoder": name, **measure_decode(decode, pixels, repeats)})
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
    }
    return {"machine": machine, "rows": rows, "decode_rows": decode_rows}


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, zlib {machine['zlib']}",
        "",
        "| size | picture | encoder | ms (median) | MB |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['size']} | {row['picture']} | {row['encoder']} | {row['median_ms']} | {row['megabytes']} |")
    lines += [
        "",
        "Input PNGs (Pillow's default level) decoded to RGB:",
        "",
        "| size | picture | decoder | ms (median) | MB in |",
        "|---|---|---|---|---|",
    ]
    for row in report["decode_rows"]:
        lines.append(f"| {row['size']} | {row['picture']} | {row['decoder']} | {row['median_ms']} | {row['megabytes']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated WxH")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True, help="folder for output_encoding.json and .md")
    args = parser.parse_args(argv)
    report = run([size for size in args.sizes.split(",") if size], args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "output_encoding.json").write_text(json.dumps(report, indent=2))
    (args.out / "output_encoding.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
