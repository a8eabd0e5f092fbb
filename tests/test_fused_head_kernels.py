"""The attention-input kernels (stages/kernels/heads.py) against eager float32 references through
Triton's CPU interpreter: per-head RMSNorm with each stream's weights, RoPE on interleaved pairs, text
tokens gathered first, two batches, odd token counts, fused and unfused QKV sources, and the FP8
path's bounded Q/K scales and per-head V scale (before the e4m3 cast, which the interpreter gets
wrong; tests/test_fused_kernels_gpu.py checks the cast)."""

from __future__ import annotations

import pytest
import torch

from tests.fused_references import assert_written, bf16_with_outliers, rms_norm_reference, rope_reference, rope_tables

heads_kernels = pytest.importorskip("stages.kernels.heads", reason="needs triton (requirements-dev.txt)")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not heads_kernels.triton.knobs.runtime.interpret,
    reason="no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it on CPU machines)",
)

BATCH, TEXT, IMAGE, HEADS, DIM = 2, 5, 11, 3, 16
WIDTH = HEADS * DIM


def _double_block_inputs(gen, fused: bool):
    """(text q, k, v), (image q, k, v) as the QKV GEMMs leave them, norm weights, cos, sin."""

    def source(rows):
        if fused:  # views of one [q | k | v] tensor, row stride 3 * WIDTH
            qkv = bf16_with_outliers(rows, 3 * WIDTH, generator=gen) * 2
            return qkv[:, :WIDTH], qkv[:, WIDTH : 2 * WIDTH], qkv[:, 2 * WIDTH :]
        return tuple(bf16_with_outliers(rows, WIDTH, generator=gen) * 2 for _ in range(3))

    text, image = source(BATCH * TEXT), source(BATCH * IMAGE)
    norms = tuple((1 + 0.3 * torch.randn(DIM, generator=gen)).to(torch.bfloat16) for _ in range(4))
    cos, sin = rope_tables(TEXT + IMAGE, DIM, gen)
    return text, image, norms, cos, sin


def _reference(text, image, norms, cos, sin):
    """q, k, v (B, S, H, D) in float32, text tokens first, each stream normalised with its weights."""

    def tokens(rows, count):
        return rows.reshape(BATCH, count, HEADS, DIM)

    q = torch.cat([rms_norm_reference(tokens(text[0], TEXT), norms[0]), rms_norm_reference(tokens(image[0], IMAGE), norms[2])], dim=1)
    k = torch.cat([rms_norm_reference(tokens(text[1], TEXT), norms[1]), rms_norm_reference(tokens(image[1], IMAGE), norms[3])], dim=1)
    v = torch.cat([tokens(text[2], TEXT), tokens(image[2], IMAGE)], dim=1).float()
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin), v


def _poisoned(*shape):
    return torch.full(shape, float("nan"))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


# Launch layouts: the default; the heads split over programs (2 per program: the last program has one
# masked head) with two token rows each (the odd token counts leave the last row of a program past the end)
LAYOUTS = {"default": {}, "2-heads-2-rows": {"heads_per_program": 2, "rows_per_program": 2}}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused-qkv", "separate-qkv"])
def test_bf16_attention_inputs(gen, fused, layout):
    text, image, norms, cos, sin = _double_block_inputs(gen, fused)
    q, k, v = (_poisoned(BATCH, TEXT + IMAGE, HEADS, DIM) for _ in range(3))
    heads_kernels.launch_qk_norm_rope(text, image, BATCH, HEADS, norms, cos, sin, 1e-6, q, k, v, **LAYOUTS[layout])
    for got, want in zip((q, k, v), _reference(text, image, norms, cos, sin)):
        assert_written(got)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_single_stream_inputs(gen):
    # single blocks: one source holds every token; its norm weights serve all of them
    _, image, norms, cos, sin = _double_block_inputs(gen, fused=True)
    cos, sin = cos[:IMAGE], sin[:IMAGE]
    q, k, v = (_poisoned(BATCH, IMAGE, HEADS, DIM) for _ in range(3))
    heads_kernels.launch_qk_norm_rope(None, image, BATCH, HEADS, norms, cos, sin, 1e-6, q, k, v)
    tokens = [x.reshape(BATCH, IMAGE, HEADS, DIM) for x in image]
    torch.testing.assert_close(q, rope_reference(rms_norm_reference(tokens[0], norms[2]), cos, sin), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k, rope_reference(rms_norm_reference(tokens[1], norms[3]), cos, sin), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, tokens[2].float())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_attention_inputs_and_scales(gen, layout):
    text, image, norms, cos, sin = _double_block_inputs(gen, fused=True)
    q_bound = torch.stack([norms[0].float().abs().max(), norms[2].float().abs().max()]).max() * DIM**0.5
    k_bound = torch.stack([norms[1].float().abs().max(), norms[3].float().abs().max()]).max() * DIM**0.5
    q, k, v = (_poisoned(BATCH, TEXT + IMAGE, HEADS, DIM) for _ in range(3))
    v_amax, v_scale = torch.zeros(BATCH, HEADS), _poisoned(BATCH, HEADS)
    descales = (q_bound.reshape(1, 1) / 448, k_bound.reshape(1, 1) / 448)
    heads_kernels.launch_qk_norm_rope(text, image, BATCH, HEADS, norms, cos, sin, 1e-6, q, k, v, descales, v_amax, **LAYOUTS[layout])
    heads_kernels.launch_v_fp8(text[2], image[2], BATCH, HEADS, v_amax, v, v_scale)
    want_q, want_k, want_v = _reference(text, image, norms, cos, sin)
    torch.testing.assert_close(v_amax, want_v.abs().amax(dim=(1, 3)))
    torch.testing.assert_close(v_scale, want_v.abs().amax(dim=(1, 3)) / 448)
    for got, want, scale in ((q, want_q, q_bound / 448), (k, want_k, k_bound / 448), (v, want_v, v_scale[:, None, :, None])):
        assert_written(got)
        assert got.abs().max() <= 448
        torch.testing.assert_close(got, (want / scale).clamp(-448, 448), rtol=1e-3, atol=2e-3)
