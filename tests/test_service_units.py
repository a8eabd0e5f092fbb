"""The service's small pure parts, in process: flag mapping, content negotiation, image
normalisation, CORS and the API key together."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.edits import negotiate
from service.errors import APIError
from service.images import bytes_from_text, decode_image, to_rgb
from service.optimizations import merge
from service.settings import ServiceSettings
from stages.config import LEGACY_FLAGS, ConflictingFlags, OptimizationConfig, legacy_changes


def test_the_original_flat_flags_map_onto_stages():
    changes = legacy_changes(
        {"use_flash_attention": True, "use_mxfp4": True, "use_dpm_solver": True, "use_cuda_graphs": True, "use_compile": None}
    )
    dpm = LEGACY_FLAGS["use_dpm_solver"][1].on
    assert changes == {"attention": "fa3", "quantization": "auto", "scheduler": dpm, "cuda_graphs": True}
    assert legacy_changes({"use_fp8": True, "use_mxfp4": False}) == {"quantization": "fp8"}  # a true flag wins
    assert legacy_changes({"use_flash_attention": False}) == {"attention": "sdpa"}
    with pytest.raises(ConflictingFlags) as conflict:
        legacy_changes({"use_mxfp4": True, "use_fp8": True})
    assert conflict.value.flag == "use_fp8"
    with pytest.raises(APIError) as refused:  # the service names the flag in a 422
        merge(OptimizationConfig(), {"use_mxfp4": True, "use_fp8": True}, {}, True)
    assert refused.value.status_code == 422 and refused.value.field == "use_fp8"


def test_the_optimizations_object_wins_over_flags_and_both_over_the_server_default():
    default = OptimizationConfig(compile=True)
    merged = merge(default, {"use_flash_attention": True}, {"attention": "cudnn", "cache_threshold": 0.3}, True)
    config = merged.config
    assert config == merged.requested and config.attention == "cudnn" and config.compile is True and config.cache_threshold == 0.3
    assert merged.warnings == [] and merged.ignored == {}


@pytest.mark.parametrize(
    "accept, expected",
    [
        (None, None),
        ("*/*", None),
        ("application/json", None),
        ("image/*", "image/*"),
        ("image/webp", "image/webp"),
        ("application/json, image/png", None),
        ("image/jpeg, application/json;q=0.5", "image/jpeg"),
        ("text/html,*/*;q=0.8", None),
        ("image/gif", None),
    ],
)
def test_accept_negotiation_prefers_json_on_ties(accept, expected):
    assert negotiate(accept) == expected


def test_normalisation_scales_16_bit_and_composites_alpha_over_white():
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen)).min() == 255
    transparent = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert transparent.mode == "RGB" and np.asarray(transparent).min() == 255


@pytest.mark.parametrize("decoder", ["installed", "binascii"])
def test_base64_forms(decoder, monkeypatch):
    """The same answers from pybase64 (requirements.txt) and from binascii, where pybase64 is missing."""
    from service import images

    if decoder == "binascii":
        monkeypatch.setattr(images, "_PYBASE64", None)
    data = b"\x89PNG-ish bytes\xff\xfe"
    standard = base64.b64encode(data).decode()
    assert bytes_from_text(standard) == data
    assert bytes_from_text(base64.urlsafe_b64encode(data).decode().rstrip("=")) == data
    assert bytes_from_text("data:image/png;base64," + standard) == data
    assert bytes_from_text(standard[:8] + "\n" + standard[8:]) == data
    assert bytes_from_text("\n".join(standard[i : i + 4] for i in range(0, len(standard), 4)) + "\n") == data  # MIME-wrapped
    assert bytes_from_text("DATA:image/png;base64," + standard) == data  # the scheme in any case
    bad_inputs = (
        ("abc$", "not valid base64"),
        (" \n ", "is empty"),
        ("ab c$", "not valid base64"),
        ("QUJD\u00e9", "not valid base64"),  # not ASCII
        ("QQ==QQ==", "not valid base64"),  # data after the padding
    )
    for bad, says in bad_inputs:
        with pytest.raises(APIError, match=says):
            bytes_from_text(bad)


def test_png_stores_what_deflate_cannot_shrink_and_compresses_the_rest():
    """Noise is stored (level 0: the same file level 1 makes, 7x faster); a picture whose rows repeat
    compresses, though each row alone is noise (the probe filters as libpng's "up" filter does)."""
    from service.images import encode_png, incompressible

    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    stripes = np.repeat(noise[:1], 96, axis=0)
    gradient = np.broadcast_to(np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None], (96, 128, 3)).copy()
    assert incompressible(noise) and not incompressible(stripes) and not incompressible(gradient)
    assert not incompressible(noise[:1])  # one row: nothing to judge by, the usual level
    for pixels in (noise, stripes, gradient):
        encoded = encode_png(pixels)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded))), pixels)
    assert len(encode_png(noise)) >= noise.nbytes and len(encode_png(stripes)) < noise.nbytes // 10


def test_decoded_images_are_upright_rgb_with_notes():
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 20), (10, 20, 30, 255)).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), max_pixels=10_000, min_side=16)
    assert decoded.image.mode == "RGB" and decoded.image.size == (40, 20) and decoded.source_format == "PNG"
    with pytest.raises(APIError) as too_big:
        decode_image(buffer.getvalue(), max_pixels=500, min_side=16)
    assert too_big.value.error_type == "image_too_large"


def test_cors_only_for_configured_origins_and_preflight_needs_no_key(tiny_engine):
    settings = ServiceSettings(warmup=False, api_key="k", cors_origins=("https://app.example",))
    with TestClient(create_app(tiny_engine, settings)) as client:
        asks = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        preflight = client.options("/inference", headers=asks)
        allowed = client.get("/health", headers={"Origin": "https://app.example"})
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        refused = client.get("/metrics", headers={"Origin": "https://app.example"})
        keyed = client.get("/metrics", headers={"Authorization": "Bearer k"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"
    assert keyed.status_code == 200 and "kontext_http_requests_total" in keyed.text


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_png_output_is_lossless_rgb(mode):
    import io

    import numpy as np
    from PIL import Image

    from service.images import encode_image

    pixels = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels).convert(mode)
    decoded = Image.open(io.BytesIO(encode_image(picture, "png")))
    assert decoded.format == "PNG" and decoded.size == (80, 48)
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(picture.convert("RGB")))


def test_png_output_without_imagecodecs_falls_back_to_pillow_and_says_so(monkeypatch, caplog):
    import io
    import logging
    import sys

    import numpy as np
    from PIL import Image

    from service import images

    pixels = np.random.default_rng(4).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # `import imagecodecs` raises ImportError
    images.fast_png_codec.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="service.images"):
            encoded = images.encode_image(Image.fromarray(pixels), "png")
        assert images.fast_png_codec() is None and "Pillow encodes PNGs" in caplog.text
    finally:
        images.fast_png_codec.cache_clear()  # the next test gets imagecodecs again
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded))), pixels)


@pytest.mark.parametrize("encoder", ["installed", "standard library"])
def test_base64_text_of_an_answer_is_the_standard_encoding(encoder, monkeypatch):
    from service import images

    if encoder == "standard library":
        monkeypatch.setattr(images, "_PYBASE64", None)
    blob = bytes(range(256)) * 5 + b"\x00\xff"
    assert images.base64_text(blob) == base64.b64encode(blob).decode("ascii")
