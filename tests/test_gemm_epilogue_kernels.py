"""The epilogue GEMMs (stages/kernels/gemm_epilogue.py) against eager float32 references, through
Triton's CPU interpreter: row counts that leave a partial tile, more output tiles than programs (the
persistent loop takes several), widths narrower than one tile, bias, outliers and a zero row. As in
tests/test_fused_row_kernels.py, the launchers write float32 values before the e4m3 cast here;
tests/test_fused_kernels_gpu.py checks the compiled kernels' real e4m3 on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.fused_references import FP8, assert_written, bf16_with_outliers, block_reference, check_blocks, gelu_tanh, rowwise_reference

gemm_epilogue = pytest.importorskip("stages.kernels.gemm_epilogue", reason="needs triton (requirements-dev.txt)")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not gemm_epilogue.triton.knobs.runtime.interpret,
    reason="no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it on CPU machines)",
)
# Small tiles keep the interpreter quick; the kernels' code is the same at every tile
TILE = (32, 128, 128, 2, 4)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 of x and its (rows,) scales, as the fused kernels and torchao write them."""
    values, scale = rowwise_reference(x)
    return values.to(FP8), scale


def dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def _fc1_inputs(gen, rows: int, k: int, n: int):
    x = bf16_with_outliers(rows, k, generator=gen)
    x[3] = 0  # a zero row: its output is GELU(bias) alone
    w = bf16_with_outliers(n, k, generator=gen) / k**0.5
    bias = bf16_with_outliers(n, generator=gen) * 0.1
    (x8, x_scale), (w8, w_scale) = fp8_rows(x), fp8_rows(w)
    exact = dequantized(x8, x_scale) @ dequantized(w8, w_scale).t() + bias.float()
    return x8, x_scale, w8, w_scale, bias, exact


@pytest.mark.parametrize("rows", [37, 101], ids=["one-row-tile", "more-tiles-than-programs"])
def test_fc1_writes_gelu_as_block_scaled_e4m3(gen, rows):
    x8, x_scale, w8, w_scale, bias, exact = _fc1_inputs(gen, rows, 256, 384)
    out = torch.full((rows, 384), float("nan"))
    out_scale = torch.full((3, rows), float("nan"))
    gemm_epilogue.launch_gemm(x8, x_scale, w8, w_scale, bias, out, out_scale, a_blocks=False, gelu_fp8=True, tile=TILE)
    assert_written(out)
    assert_written(out_scale)
    check_blocks(out, out_scale, block_reference(gelu_tanh(exact)))


def test_fc1_writes_into_a_column_slice_of_a_wider_row(gen):
    # the single blocks' layout: the MLP's part after the attention's, in one buffer with one row stride
    x8, x_scale, w8, w_scale, bias, exact = _fc1_inputs(gen, 37, 128, 256)
    out = torch.full((37, 128 + 256), float("nan"))
    out_scale = torch.full((3, 37), float("nan"))
    gemm_epilogue.launch_gemm(x8, x_scale, w8, w_scale, None, out, out_scale, a_blocks=False, gelu_fp8=True, out_column=128, tile=TILE)
    assert torch.isnan(out[:, :128]).all() and torch.isnan(out_scale[0]).all()  # the lead part is left alone
    check_blocks(out[:, 128:], out_scale[1:], block_reference(gelu_tanh(exact - bias.float())))
    assert (out[3, 128:] == 0).all() and (out_scale[1:, 3] > 0).all()  # no bias: the zero row's blocks are zero, scales finite


def test_plain_gemm_matches_the_rowwise_product(gen):
    x8, x_scale, w8, w_scale, bias, exact = _fc1_inputs(gen, 101, 256, 384)
    out = torch.full((101, 384), float("nan"), dtype=torch.bfloat16)
    gemm_epilogue.launch_gemm(x8, x_scale, w8, w_scale, bias, out, None, a_blocks=False, gelu_fp8=False, tile=TILE)
    assert_written(out)
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=1e-2)  # bf16 output rounding


def test_fc2_applies_the_block_scales_at_each_k_step(gen):
    rows, k, n = 101, 384, 256
    values, scales = block_reference(bf16_with_outliers(rows, k, generator=gen).float() * 3)
    a8 = values.to(FP8)
    w8, w_scale = fp8_rows(bf16_with_outliers(n, k, generator=gen) / k**0.5)
    bias = bf16_with_outliers(n, generator=gen)
    # the reference dequantizes A block by block: a single row scale would not reproduce it
    a = (a8.float().reshape(rows, k // 128, 128) * scales.t()[:, :, None]).reshape(rows, k)
    exact = a @ dequantized(w8, w_scale).t() + bias.float()
    out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16)
    gemm_epilogue.launch_gemm(a8, scales.contiguous(), w8, w_scale, bias, out, None, a_blocks=True, gelu_fp8=False, tile=TILE)
    assert_written(out)
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=1e-2)


def test_lead_part_is_quantized_in_the_same_blocks(gen):
    lead = bf16_with_outliers(37, 384, generator=gen)
    out = torch.full((37, 512), float("nan"))
    out_scale = torch.full((4, 37), float("nan"))
    gemm_epilogue.launch_blocks_fp8(lead, out, out_scale)
    assert torch.isnan(out_scale[3]).all()
    assert torch.isnan(out[:, 384:]).all()
    check_blocks(out[:, :384], out_scale[:3], block_reference(lead))


def test_the_ops_compose_the_single_blocks_row(gen):
    """fp8_gemm_gelu_blocks with a lead, then fc2 on its block scales: the MLP output of [lead, GELU(fc1)]."""
    x8, x_scale, w8, w_scale, bias, exact = _fc1_inputs(gen, 37, 128, 256)
    lead = bf16_with_outliers(37, 128, generator=gen)
    y8, y_scales = torch.ops.kontext.fp8_gemm_gelu_blocks(x8, x_scale, w8, w_scale, bias, lead)
    assert y8.dtype == FP8 and y8.shape == (37, 384) and y_scales.shape == (3, 37)
    row = torch.cat([lead.float(), gelu_tanh(exact)], dim=1)
    got = (y8.float().reshape(37, 3, 128) * y_scales.t()[:, :, None]).reshape(37, 384)
    torch.testing.assert_close(got, row, rtol=0.07, atol=1e-2)  # within e4m3's step (2^-3 relative at most, 1/16 typical)
    w2_8, w2_scale = fp8_rows(bf16_with_outliers(64, 384, generator=gen) / 384**0.5)
    projected = torch.empty(37, 64, dtype=torch.bfloat16)
    gemm_epilogue.launch_gemm(y8, y_scales, w2_8, w2_scale, None, projected, None, a_blocks=True, gelu_fp8=False)
    want = got @ dequantized(w2_8, w2_scale).t()
    torch.testing.assert_close(projected.float(), want, rtol=2e-2, atol=2e-2)


def test_widths_that_are_not_whole_blocks_are_refused(gen):
    x8, x_scale, w8, w_scale, bias, _ = _fc1_inputs(gen, 5, 128, 256)
    with pytest.raises(ValueError, match="multiples of 128"):
        torch.ops.kontext.fp8_gemm_gelu_blocks(x8, x_scale, w8, w_scale, bias, bf16_with_outliers(5, 96, generator=gen))


@pytest.mark.parametrize("halves", [False, True], ids=["one-stream", "text-and-image-halves"])
def test_fc2_writes_the_gated_residual_stream(gen, halves):
    """The double blocks' h + gate * ff and the single blocks' [text; image] + gate * proj_out, in the
    fc2 epilogue: two batches, residual rows from strided views of one or two tensors."""
    batch, text, image, k, n = 2, 7, 45, 256, 128
    tokens = text + image if halves else image
    values, scales = block_reference(bf16_with_outliers(batch * tokens, k, generator=gen).float())
    a8 = values.to(FP8)
    w8, w_scale = fp8_rows(bf16_with_outliers(n, k, generator=gen) / k**0.5)
    bias = bf16_with_outliers(n, generator=gen) * 0.1
    image_stream = bf16_with_outliers(batch, image, 2 * n, generator=gen)[:, :, n:]  # a strided view
    text_stream = bf16_with_outliers(batch, text, n, generator=gen)
    gate = bf16_with_outliers(batch, 3 * n, generator=gen)[:, n : 2 * n]  # a chunk, as diffusers makes it
    head, tail = (text_stream, image_stream) if halves else (image_stream, None)
    residual = torch.cat([text_stream, image_stream], dim=1) if halves else image_stream
    a = (a8.float().reshape(-1, k // 128, 128) * scales.t()[:, :, None]).reshape(-1, k)
    product = (a @ dequantized(w8, w_scale).t() + bias.float()).reshape(batch, tokens, n)
    exact = residual.float() + gate.float()[:, None] * product
    got = torch.ops.kontext.fp8_gemm_a_blocks_gated_residual(a8, scales.contiguous(), w8, w_scale, bias, head, tail, gate)
    assert got.shape == (batch, tokens, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, rtol=1e-2, atol=2e-2)


def test_the_gemm_launch_passes_only_tensors_and_numbers(monkeypatch, gen):
    """What Inductor's tracing of a triton_op can pass to a kernel: tensors and plain numbers. A
    host-side TMA descriptor built in the launcher became a constant holding its trace-time tensor,
    and the compiled blocks failed to build (H100, 2026-12-07); the kernel makes its descriptors on
    the device instead. The CPU interpreter cannot trace the op, so this checks the launch itself."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    launches = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    monkeypatch.setattr(gemm_epilogue, "wrap_triton", Recording)
    x8, x_scale, w8, w_scale, bias, _ = _fc1_inputs(gen, 37, 256, 384)
    gemm_epilogue.launch_gemm(x8, x_scale, w8, w_scale, bias, torch.empty(37, 384), torch.empty(3, 37), a_blocks=False, gelu_fp8=True)
    ((kernel, args, kwargs),) = launches
    assert kernel is gemm_epilogue._fp8_gemm_kernel
    for value in (*args, *kwargs.values()):
        assert not isinstance(value, TensorDescriptor)
        assert isinstance(value, (torch.Tensor, int, float, bool)), type(value)
    assert "GROUP_M" in kwargs  # every constexpr passed: the kernel mutation analysis needs the full signature
