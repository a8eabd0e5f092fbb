"""Bad and unusual input over real HTTP: every bad input gets a 4xx JSON error naming the field, odd
but valid images are normalised (and the response says how), and the server keeps serving."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service_server import api_server

pytestmark = pytest.mark.slow

BASE = {"prompt": "make the sky red", "steps": 1, "seed": 0}


@pytest.fixture(scope="module")
def server(pytestconfig):
    return api_server(pytestconfig)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that declares a huge canvas, with almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def gradient(size=(96, 64), mode="RGB") -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :].repeat(size[1], 0)
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 90)], axis=-1)).convert(mode)


def assert_error(response: httpx.Response, status: int, field: str | None, *words: str, error_type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["request_id"]
    if field is not None:
        assert error["field"] == field, error
    for word in words:
        assert word.lower() in error["message"].lower(), error
    if error_type:
        assert error["type"] == error_type, error
    return error


# -- images that must be refused ------------------------------------------------------------------
def test_non_image_bytes(client):
    assert_error(
        client.post("/inference", json={**BASE, "image": b64(b"just some text, not a picture" * 20)}),
        422,
        "image",
        "not a recognised image",
    )
    files = {"image": ("x.png", b"%PDF-1.7 not an image", "image/png")}
    assert_error(client.post("/inference", files=files, data={"prompt": "x"}), 422, "image", "not a recognised image")


def test_truncated_images(client):
    for fmt in ("PNG", "JPEG"):
        data = encoded(gradient((256, 256)), fmt)
        assert_error(
            client.post("/inference", json={**BASE, "image": b64(data[: len(data) // 2])}),
            422,
            "image",
            "truncated or corrupt",
            error_type="invalid_image",
        )


def test_decompression_bomb_and_huge_dimensions(client):
    bomb = assert_error(
        client.post("/inference", json={**BASE, "image": b64(png_claiming(100_000, 100_000))}), 422, "image", "MP input limit"
    )
    assert bomb["type"] == "image_too_large"
    huge = encoded(Image.new("L", (5000, 5000), 128))  # 25 MP, a few kB compressed
    assert_error(client.post("/inference", json={**BASE, "image": b64(huge)}), 422, "image", "MP input limit", error_type="image_too_large")


def test_one_pixel_image(client):
    assert_error(
        client.post("/inference", json={**BASE, "image": b64(encoded(Image.new("RGB", (1, 1))))}), 422, "image", "1x1 is too small"
    )


def test_base64_and_urls(client):
    assert_error(client.post("/inference", json={**BASE, "image": "@@@ not base64 @@@"}), 422, "image", "base64")
    assert_error(client.post("/inference", json={**BASE, "image": "https://example.com/cat.png"}), 422, "image", "not fetched")
    assert_error(client.post("/inference", json={**BASE, "image": "data:image/png,rawtext"}), 422, "image", "data:")


# -- unusual images that must work ----------------------------------------------------------------
def _palette_with_transparency() -> bytes:
    image = Image.new("P", (64, 48), 0)
    image.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    image.paste(1, (0, 0, 32, 48))
    return encoded(image, transparency=0)


def _sixteen_bit() -> bytes:
    pixels = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    return encoded(Image.fromarray(pixels))  # uint16: mode I;16


@pytest.mark.parametrize(
    "name, data, note",
    [
        ("cmyk_jpeg", lambda: encoded(gradient(mode="CMYK"), "JPEG"), "CMYK"),
        ("palette_png", _palette_with_transparency, "colour mode P"),
        ("sixteen_bit_png", _sixteen_bit, "colour mode I"),
        ("rgba_png", lambda: encoded(Image.new("RGBA", (64, 48), (255, 0, 0, 100))), "alpha composited over white"),
        ("greyscale_alpha", lambda: encoded(Image.new("LA", (64, 48), (100, 50))), "alpha"),
    ],
)
def test_unusual_colour_modes_are_normalised(client, name, data, note):
    response = client.post("/inference", json={**BASE, "image": b64(data())})
    body = response.json()
    assert response.status_code == 200, body
    assert any(note in warning for warning in body["warnings"]), body["warnings"]


def test_exif_rotated_jpeg_is_turned_upright(client):
    stored = gradient((96, 48))  # landscape as stored; orientation 6 = rotate 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    response = client.post("/inference", json={**BASE, "image": b64(encoded(stored, "JPEG", exif=exif.tobytes()))})
    body = response.json()
    assert response.status_code == 200, body
    assert body["height"] > body["width"]  # the output follows the upright (portrait) picture
    assert any("EXIF orientation" in warning for warning in body["warnings"])


def test_animated_gif_uses_the_first_frame(client):
    frames = [Image.new("RGB", (64, 48), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files = {"image": ("anim.gif", buffer.getvalue(), "image/gif")}
    response = client.post("/inference", files=files, data={"prompt": "x", "steps": "1"})
    assert response.status_code == 200, response.text
    assert any("3 frames; the first frame was used" in warning for warning in response.json()["warnings"])


# -- bodies and fields ----------------------------------------------------------------------------
def test_body_over_the_size_cap(client):
    big = b'{"prompt": "x", "image": "' + b"A" * (5 * 2**20) + b'"}'
    assert_error(
        client.post("/inference", content=big, headers={"content-type": "application/json"}),
        413,
        "body",
        "4 MB limit",
        error_type="body_too_large",
    )

    def chunks():  # no Content-Length: counted while it arrives
        yield b'{"prompt": "x", "image": "'
        for _ in range(5):
            yield b"A" * 2**20
        yield b'"}'

    assert_error(client.post("/inference", content=chunks(), headers={"content-type": "application/json"}), 413, "body", "limit")


def test_malformed_json_and_wrong_bodies(client):
    headers = {"content-type": "application/json"}
    assert_error(
        client.post("/inference", content=b'{"prompt": "x", ', headers=headers), 400, "body", "malformed JSON", error_type="invalid_json"
    )
    assert_error(client.post("/inference", content=b"", headers=headers), 400, "body", "empty")
    assert_error(client.post("/inference", content=b'["prompt"]', headers=headers), 422, "body")
    assert_error(
        client.post("/inference", content=b'{"prompt": "\\ud800"}', headers=headers), 400, "body", "malformed JSON"
    )  # a lone surrogate
    assert_error(client.post("/inference", files={"image": ("a.png", b"x")}, data={"prompt": "a\x00b"}), 422, "prompt", "NUL")
    assert_error(client.post("/inference", content=b"prompt=x", headers={"content-type": "text/plain"}), 415, "Content-Type")
    assert_error(
        client.post("/inference", files={"image": ("a.png", b"x")}, data={"prompt": "x", "optimizations": "{not json"}),
        422,
        "optimizations",
        "JSON object",
    )


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"prompt": "x" * 2001}, "prompt", ["at most 2000"]),
        ({"prompt": "   "}, "prompt", ["blank"]),
        ({"steps": 0}, "steps", ["greater than or equal to 1"]),
        ({"steps": 101}, "steps", ["less than or equal to 100"]),
        ({"steps": 60}, "steps", ["limit of 50"]),
        ({"steps": True}, "steps", ["not a boolean"]),
        ({"guidance_scale": -1}, "guidance_scale", []),
        ({"guidance_scale": 25}, "guidance_scale", []),
        ({"true_cfg_scale": 0.5}, "true_cfg_scale", []),
        ({"width": 100_000, "height": 64}, "width", []),
        ({"width": 65, "height": 64}, "width", ["multiple of 16"]),
        ({"width": 64}, "height", ["both"]),
        ({"width": 4096, "height": 4096}, "width", ["range"]),
        ({"width": 2048, "height": 2048, "num_images": 2}, "width", ["MP"]),
        ({"num_images": 0}, "num_images", []),
        ({"num_images": 9}, "num_images", []),
        ({"num_images": 5}, "num_images", ["limit of 4"]),
        ({"seed": -1}, "seed", []),
        ({"output_format": "gif"}, "output_format", []),
        ({"optimizations": {"flash": True}}, "optimizations.flash", ["unknown optimization", "attention"]),
        ({"optimizations": {"attention": "fa4"}}, "optimizations.attention", ["fa3"]),
        ({"optimizations": {"scheduler": "ddim"}}, "optimizations.scheduler", []),
        ({"optimizations": {"cache_threshold": 50}}, "optimizations.cache_threshold", []),
        ({"use_fa4": True}, "use_fa4", ["unknown field"]),
        ({"use_fp8": True, "use_mxfp4": True}, "use_fp8", ["only one"]),
    ],
)
def test_out_of_range_and_unknown_fields(client, changes, field, words):
    assert_error(client.post("/inference", json={**BASE, **changes}), 422, field, *words)


def test_still_serving_after_all_of_that(client, server):
    assert client.get("/health").json()["status"] == "ready"
    assert client.post("/inference", json={**BASE, "width": 32, "height": 32}).status_code == 200
    assert "Traceback" not in server.log(tail=10**7)
