"""benchmarks/epilogue_lab.py's CPU-side pieces: the block quantizers that feed cuBLAS's block-scaled
recipes (the Triton GEMM itself needs TMA, a Hopper GPU: the lab's own rows check it there against
an fp32 reference), and its refusal without such a GPU."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton", reason="needs triton (requirements-dev.txt)")
lab = pytest.importorskip("benchmarks.epilogue_lab")


def test_128x128_blocks_round_trip_within_e4m3_rounding():
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(0))
    w[3, 200] = 40.0  # an outlier only its own block's scale sees
    q, scale = lab.quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    restored = (q.float().reshape(2, 128, 3, 128) * scale[:, None, :, None]).reshape(256, 384)
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself, relative to its block's maximum
    blocks_max = w.abs().reshape(2, 128, 3, 128).amax(dim=(1, 3))
    bound = (blocks_max / 16)[:, None, :, None].expand(2, 128, 3, 128).reshape(256, 384)
    assert ((restored - w).abs() <= bound).all()
    assert scale[0, 1] == pytest.approx(40.0 / 448)


def test_block_rows_dequantize_each_128_columns_with_their_scale():
    q = torch.full((2, 256), 2.0).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 3.0], [0.5, 0.25]])
    got = lab.dequantize_block_rows(q, scale)
    assert torch.equal(got[:, :128], torch.tensor([[2.0], [1.0]]).expand(2, 128))
    assert torch.equal(got[:, 128:], torch.tensor([[6.0], [0.5]]).expand(2, 128))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["epilogue_lab"])
    with pytest.raises(SystemExit, match="Hopper"):
        lab.main()
