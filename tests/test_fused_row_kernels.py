"""The row kernels (stages/kernels/rows_fp8.py) against their eager float32 references, through Triton's
CPU interpreter: odd row counts, widths that are not powers of two, two batches, strided inputs,
outliers and a zero row. The interpreter rounds to e4m3 wrongly, so here the kernels write their
float32 values before the cast and torch casts them; tests/test_fused_kernels_gpu.py checks the real
e4m3 outputs on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.fused_references import (
    assert_written,
    bf16_with_outliers,
    check_fp8_rows,
    gelu_tanh,
    modulated_norm,
    rowwise_reference,
)

rows_fp8 = pytest.importorskip("stages.kernels.rows_fp8", reason="needs triton (requirements-dev.txt)")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not rows_fp8.triton.knobs.runtime.interpret,
    reason="no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it on CPU machines)",
)


def _outputs(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((rows, width), float("nan")), torch.full((rows,), float("nan"))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_modulated_norm_of_one_tensor(gen):
    x = bf16_with_outliers(2, 37, 96, generator=gen)
    shift, scale = (bf16_with_outliers(2, 96, generator=gen) * 0.5 for _ in range(2))
    out, out_scale = _outputs(2 * 37, 96)
    rows_fp8.launch_modulated_norm(x, None, shift, scale, 1e-6, out, out_scale)
    assert_written(out)
    check_fp8_rows(out, out_scale, rowwise_reference(modulated_norm(x, shift, scale)))


# 1 is the default; 4 puts the text/image boundary and the end of each batch inside a program's tile
NORM_ROWS = pytest.mark.parametrize("rows", [1, 4], ids=["row", "4rows"])


@NORM_ROWS
def test_modulated_norm_reads_two_halves_without_concatenating(gen, rows):
    # the single blocks' input: text rows from one tensor, image rows from another, both strided views
    text_store = bf16_with_outliers(2, 7, 128, generator=gen)
    image_store = bf16_with_outliers(2, 31, 160, generator=gen)
    text, image = text_store[:, 1:6, 16:112], image_store[:, :, 32:128]
    emb = bf16_with_outliers(2, 6 * 96, generator=gen)
    shift, scale = emb[:, :96], emb[:, 96:192]  # chunks of one modulation vector, as diffusers makes them
    out, out_scale = _outputs(2 * 36, 96)
    rows_fp8.launch_modulated_norm(text, image, shift, scale, 1e-6, out, out_scale, rows_fp8.norm_options(96, rows))
    assert_written(out)
    reference = modulated_norm(torch.cat([text, image], dim=1), shift, scale)
    check_fp8_rows(out, out_scale, rowwise_reference(reference))


@pytest.mark.parametrize("chunk", [32, 64], ids=["chunks-fit", "last-chunk-masked"])
def test_the_chunked_norm_candidate_computes_the_same_rows(gen, chunk):
    # the sweep's candidate (rows_fp8.launch_modulated_norm_chunked) over two strided halves, as above
    text = bf16_with_outliers(2, 7, 128, generator=gen)[:, 1:6, 16:112]
    image = bf16_with_outliers(2, 31, 160, generator=gen)[:, :, 32:128]
    shift, scale = (bf16_with_outliers(2, 96, generator=gen) * 0.5 for _ in range(2))
    out, out_scale = _outputs(2 * 36, 96)
    rows_fp8.launch_modulated_norm_chunked(text, image, shift, scale, 1e-6, out, out_scale, chunk=chunk)
    assert_written(out)
    check_fp8_rows(out, out_scale, rowwise_reference(modulated_norm(torch.cat([text, image], dim=1), shift, scale)))


@NORM_ROWS
def test_residual_modulated_norm_writes_the_stream_and_the_fp8_input(gen, rows):
    x = bf16_with_outliers(2, 23, 96, generator=gen)
    a = bf16_with_outliers(2, 23, 96, generator=gen)
    gate, shift, scale = (bf16_with_outliers(2, 96, generator=gen) for _ in range(3))
    h = torch.full((2, 23, 96), float("nan"), dtype=torch.bfloat16)
    out, out_scale = _outputs(2 * 23, 96)
    rows_fp8.launch_residual_modulated_norm(x, a, gate, shift, scale, 1e-6, h, out, out_scale, rows_fp8.norm_options(96, rows))
    expected_h = (x.float() + gate.float()[:, None] * a.float()).to(torch.bfloat16)
    assert_written(h)
    torch.testing.assert_close(h, expected_h, rtol=8e-3, atol=1e-5)  # one bf16 rounding apart at most
    check_fp8_rows(out, out_scale, rowwise_reference(modulated_norm(h, shift, scale)))


def test_gelu(gen):
    m = bf16_with_outliers(41, 200, generator=gen) * 3
    out, out_scale = _outputs(41, 200)
    rows_fp8.launch_gelu(m, out, out_scale)
    assert_written(out)
    check_fp8_rows(out, out_scale, rowwise_reference(gelu_tanh(m)))


def test_concat_gelu_has_one_scale_per_row_over_both_parts(gen):
    attention = bf16_with_outliers(2, 19, 48, generator=gen) * 4  # the larger part decides some rows' scale
    mlp = bf16_with_outliers(2 * 19, 192, generator=gen)
    out, out_scale = _outputs(2 * 19, 240)
    rows_fp8.launch_concat_gelu(attention, mlp, out, out_scale)
    assert_written(out)
    reference = torch.cat([attention.float().reshape(-1, 48), gelu_tanh(mlp)], dim=-1)
    check_fp8_rows(out, out_scale, rowwise_reference(reference))


@pytest.mark.parametrize("chunk", [32, 64, 256], ids=["chunks-fit", "last-chunk-masked", "one-chunk"])
def test_the_chunked_concat_gelu_candidate_computes_the_same_rows(gen, chunk):
    attention = bf16_with_outliers(2, 19, 48, generator=gen) * 4
    mlp = bf16_with_outliers(2 * 19, 192, generator=gen)
    out, out_scale = _outputs(2 * 19, 240)
    rows_fp8.launch_concat_gelu_chunked(attention, mlp, out, out_scale, chunk=chunk)
    assert_written(out)
    reference = torch.cat([attention.float().reshape(-1, 48), gelu_tanh(mlp)], dim=-1)
    check_fp8_rows(out, out_scale, rowwise_reference(reference))


def test_rowwise_puts_the_text_rows_of_every_batch_first(gen):
    attention = bf16_with_outliers(2, 21, 64, generator=gen)
    out, out_scale = _outputs(2 * 21, 64)
    rows_fp8.launch_rowwise(attention, 5, out, out_scale)
    assert_written(out)
    text_first = torch.cat([attention[:, :5].reshape(-1, 64), attention[:, 5:].reshape(-1, 64)])
    check_fp8_rows(out, out_scale, rowwise_reference(text_first))


def test_a_zero_row_gets_zeros_and_a_finite_scale(gen):
    m = bf16_with_outliers(5, 64, generator=gen)
    m[2] = 0
    out, out_scale = _outputs(5, 64)
    rows_fp8.launch_gelu(m, out, out_scale)
    assert torch.isfinite(out_scale).all() and out_scale[2] > 0
    assert (out[2] == 0).all()
    check_fp8_rows(out, out_scale, rowwise_reference(gelu_tanh(m)))


def test_launch_options_of_a_symbolic_width_are_plain_ints():
    """Under torch.compile the hidden width of `hidden_states` can still be a SymInt when a kernel is
    traced; options computed from it symbolically cost sympy about a minute per traced call (see
    rows_fp8.concrete). The options must come out as the plain ints of the concrete width."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    widths = {
        name: env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint)
        for name, hint in (("hidden", 3072), ("mlp", 12288))
    }
    cases = [
        (rows_fp8.norm_options(widths["hidden"]), rows_fp8.norm_options(3072)),
        (rows_fp8.launch_options(widths["hidden"]), rows_fp8.launch_options(3072)),
        (rows_fp8.gelu_parts(widths["mlp"]), rows_fp8.gelu_parts(12288)),
    ]
    for symbolic, plain in cases:
        assert all(type(value) is int for value in symbolic.values()), symbolic
        assert symbolic == plain
