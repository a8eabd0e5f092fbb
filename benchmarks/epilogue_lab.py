"""Epilogue lab (issue 22): can the MLP's GELU -> FP8 move into the fc1 GEMM's epilogue on Hopper?

Today, per MLP: fc1 (cuBLAS, row-wise FP8) writes a bf16 (tokens x 12288) activation, the gelu_fp8
kernel reads it and writes e4m3 rows with one scale per row, fc2 (cuBLAS, row-wise) reads those. The
bf16 activation costs 2 x 2 bytes per value of memory traffic and a kernel launch; only an epilogue
that never writes it removes that. A row-wise scale needs the whole row's maximum, which spans many
output tiles, so the epilogue here writes one scale per row per 128 columns instead (a tile owns its
128 columns: exact, no cross-tile step), and fc2 takes them as cuBLAS's 1x128 block scales
(`torch.nn.functional.scaled_mm`, the DeepSeek-style recipe) with the weight in 128x128 blocks.

That path pays only if (1) a Triton FP8 GEMM runs close to cuBLAS at these shapes and (2) the
block-scaled fc2 is as fast as the row-wise one. This script measures the pieces and the paths'
totals (fc2 by cuBLAS's block-scaled GEMM, and by the same Triton kernel applying the 1x128 scales
per K step), with the numerics of each against an fp32 reference, for each of a step's three MLP
sizes (`--tokens`) and what a step would save, and writes epilogue_lab.{json,md}:

    python -m benchmarks.epilogue_lab --out benchmarks/results/<gpu>-<date>/epilogue-lab

The Triton GEMM is a plain persistent TMA kernel (Triton's tutorials show the technique; no warp
specialisation, which Triton 3.6 offers on Blackwell only), swept over a few tile shapes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.fused_kernels import median_ms, quantize_rows
from stages.kernels.rows_fp8 import FP8, FP8_MAX, _gelu_tanh

WIDTH, MLP = 3072, 12288
# The MLPs of one step at 1024x1024, by token rows: 38 single blocks (512 text + 8192 image tokens),
# 19 double blocks' image streams and 19 text streams. (A single block's fc2 is proj_out, whose K is
# 15360 with the attention output; the lab's fc2 stands in for it.)
MLPS_PER_STEP = {8704: 38, 8192: 19, 512: 19}
BLOCK_SCALE = 128  # columns per scale in the epilogue's output (cuBLAS's 1x128 recipe)
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
TILES = ((128, 256, 128, 3, 8), (128, 256, 64, 4, 8), (128, 128, 128, 4, 8), (128, 128, 128, 4, 4), (128, 128, 64, 5, 4))


@triton.jit
def _fp8_gemm_kernel(
    a_desc, b_desc, a_scale_ptr, b_scale_ptr, c_ptr, c_scale_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    NUM_SMS: tl.constexpr, GELU_FP8: tl.constexpr, A_BLOCKS: tl.constexpr = False, GROUP_M: tl.constexpr = 8,
):  # fmt: skip
    """C = (A @ B^T) * a_scale[row] * b_scale[col]: bf16 C, or (GELU_FP8) e4m3 of GELU(C) with one
    scale per row per BLOCK_SCALE columns, stored transposed ((N / 128, M): outer-dim-major, as
    cuBLAS takes A's block scales). A_BLOCKS: A comes with such scales (K / 128, M) instead of one
    per row, applied to each 128-wide K step's partial product (BLOCK_K must be 128): the fc2 that
    would take the epilogue's output without cuBLAS's block-scaled GEMM."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * tiles_n
    for tile in range(pid, tiles_m * tiles_n, NUM_SMS):
        group = tile // per_group
        first_m = group * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        off_m = (first_m + tile % group_m) * BLOCK_M
        off_n = ((tile % per_group) // group_m) * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(k_tiles, num_stages=STAGES):
            a = a_desc.load([off_m, k * BLOCK_K])
            b = b_desc.load([off_n, k * BLOCK_K])
            if A_BLOCKS:
                step_scale = tl.load(a_scale_ptr + k * M + rows, mask=rows < M, other=0.0)
                acc += tl.dot(a, b.T) * step_scale[:, None]
            else:
                acc = tl.dot(a, b.T, acc)
        if not A_BLOCKS:
            acc = acc * tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)[:, None]
        acc = acc * tl.load(b_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        if GELU_FP8:
            y = tl.reshape(_gelu_tanh(acc, True), (BLOCK_M, BLOCK_N // 128, 128))
            amax = tl.maximum(tl.max(tl.abs(y), axis=2), 1e-12)  # (BLOCK_M, BLOCK_N / 128)
            q = tl.clamp(y * (448.0 / amax)[:, :, None], -448.0, 448.0)
            tl.store(c_ptr + rows[:, None] * N + cols[None, :], tl.reshape(q, (BLOCK_M, BLOCK_N)).to(c_ptr.dtype.element_ty), mask=mask)
            groups = off_n // 128 + tl.arange(0, BLOCK_N // 128)
            tl.store(c_scale_ptr + groups[None, :] * M + rows[:, None], amax / 448.0, mask=(rows < M)[:, None])
        else:
            tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def triton_fp8_gemm(a8, a_scale, w8, w_scale, tile, gelu_fp8: bool, a_blocks: bool = False):
    """a8 (M, K) e4m3 with (M,) scales (a_blocks: (K / 128, M) contiguous), w8 (N, K) e4m3 with (N,)
    scales."""
    block_m, block_n, block_k, stages, warps = tile
    (m, k), n = a8.shape, w8.shape[0]
    a_desc = TensorDescriptor.from_tensor(a8, [block_m, block_k])
    b_desc = TensorDescriptor.from_tensor(w8, [block_n, block_k])
    if gelu_fp8:
        out = torch.empty(m, n, device=a8.device, dtype=FP8)
        out_scale = torch.empty(n // BLOCK_SCALE, m, device=a8.device, dtype=torch.float32)
    else:
        out, out_scale = torch.empty(m, n, device=a8.device, dtype=torch.bfloat16), a_scale
    sms = torch.cuda.get_device_properties(a8.device).multi_processor_count if a8.is_cuda else 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    _fp8_gemm_kernel[(min(sms, tiles),)](
        a_desc, b_desc, a_scale, w_scale, out, out_scale, m, n, k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, NUM_SMS=sms, GELU_FP8=gelu_fp8,
        A_BLOCKS=a_blocks, num_warps=warps,
    )  # fmt: skip
    return (out, out_scale.t()) if gelu_fp8 else out


def cublas_rowwise(a8, a_scale, w8, w_scale):
    return torch._scaled_mm(a8, w8.t(), scale_a=a_scale[:, None], scale_b=w_scale[None, :], out_dtype=torch.bfloat16)


def quantize_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 of w (N, K) with one scale per block x block tile: (N / block, K / block) scales."""
    n, k = w.shape
    tiles = w.float().reshape(n // block, block, k // block, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(n, k)
    return q, scale


def scaling(name: str):
    """A ScalingType member: torch 2.11 spells them BlockWise1x128, later ones Blockwise_1x128."""
    from torch.nn.functional import ScalingType

    return getattr(ScalingType, name.replace("Blockwise_", "BlockWise"), None) or getattr(ScalingType, name)


def blockwise_fc2_candidates(w2: torch.Tensor):
    """(label, weight, its scale, recipe) for fc2's weight under the block recipes cuBLAS may take."""
    w_blocks, s_blocks = quantize_blocks(w2)
    n, k = w2.shape
    w_rows = w2.float().reshape(n, k // BLOCK_SCALE, BLOCK_SCALE)
    s_rows = w_rows.abs().amax(dim=2).clamp(min=1e-12) / FP8_MAX  # (N, K / 128)
    w_1x128 = (w_rows / s_rows[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(n, k)
    return [
        ("B 128x128 blocks, scale (N/128, K/128)", w_blocks, s_blocks, scaling("Blockwise_128x128")),
        ("B 128x128 blocks, scale (K/128, N/128)", w_blocks, s_blocks.t().contiguous(), scaling("Blockwise_128x128")),
        ("B 128x128 blocks, scale (K/128, N/128) outer-dim-major", w_blocks, s_blocks.t(), scaling("Blockwise_128x128")),
        ("B 1x128 blocks, scale (N, K/128) outer-dim-major", w_1x128, s_rows.t().contiguous().t(), scaling("Blockwise_1x128")),
    ]


def dequantize_block_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    m, n = q.shape
    return (q.float().reshape(m, n // BLOCK_SCALE, BLOCK_SCALE) * scale[:, :, None]).reshape(m, n)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(float((got.float() - want).norm() / want.norm()), 5)


def measure_mlp(tokens: int) -> tuple[list[dict], dict]:
    """The rows and totals of one MLP of `tokens` rows."""
    from torch.nn.functional import scaled_mm

    from stages.kernels import rows_fp8

    torch.manual_seed(0)
    x = torch.randn(tokens, WIDTH, device="cuda")
    w1 = torch.randn(MLP, WIDTH, device="cuda") / math.sqrt(WIDTH)
    w2 = torch.randn(WIDTH, MLP, device="cuda") / math.sqrt(MLP)
    # e4m3 rows and their scales, as (rows,) vectors
    (a8, a_scale), (w1_8, w1_scale), (w2_8, w2_scale) = ((q, s.reshape(-1)) for q, s in map(quantize_rows, (x, w1, w2)))
    reference_h = torch.nn.functional.gelu(x @ w1.t(), approximate="tanh")
    reference_y = reference_h @ w2.t()
    fc1_flop = 2 * tokens * WIDTH * MLP
    rows: list[dict] = []

    def row(name: str, ms: float | None, **extra) -> None:
        tflops = None if ms is None else round(fc1_flop / (ms * 1e-3) / 1e12, 1)  # fc1 and fc2 have equal FLOPs
        rows.append({"tokens": tokens, "piece": name, "ms": None if ms is None else round(ms, 4), "tflop_s": tflops, **extra})

    # today's path
    fc1 = cublas_rowwise(a8, a_scale, w1_8, w1_scale)
    h8, h_scale = rows_fp8.gelu_fp8(fc1)  # h_scale: (rows,)
    y_today = cublas_rowwise(h8, h_scale, w2_8, w2_scale)
    today = {
        "fc1": median_ms(lambda: cublas_rowwise(a8, a_scale, w1_8, w1_scale), [()]),
        "gelu": median_ms(lambda: rows_fp8.gelu_fp8(fc1), [()]),
        "fc2": median_ms(lambda: cublas_rowwise(h8, h_scale, w2_8, w2_scale), [()]),
    }
    row("cuBLAS fc1, row-wise FP8 -> bf16", today["fc1"])
    row("gelu_fp8 kernel (row-wise e4m3)", today["gelu"])
    row("cuBLAS fc2, row-wise FP8", today["fc2"], error_vs_fp32=relative_error(y_today, reference_y))

    # the Triton GEMM, plain and with the GELU -> FP8 epilogue, over the tile shapes
    best: dict[bool, tuple[float, tuple]] = {}
    for gelu_fp8 in (False, True):
        for tile in TILES:
            label = f"Triton fc1{' + GELU -> e4m3 1x128' if gelu_fp8 else ' -> bf16'}, tile {tile}"
            try:
                got = triton_fp8_gemm(a8, a_scale, w1_8, w1_scale, tile, gelu_fp8)
                ms = median_ms(lambda: triton_fp8_gemm(a8, a_scale, w1_8, w1_scale, tile, gelu_fp8), [()])
            except Exception as error:  # a tile shape this GPU or Triton cannot build: recorded, not fatal
                row(label, None, error=f"{type(error).__name__}: {str(error)[:200]}")
                continue
            check = dequantize_block_rows(got[0], got[1]) if gelu_fp8 else got
            want = reference_h if gelu_fp8 else x @ w1.t()
            row(label, ms, error_vs_fp32=relative_error(check, want), of_cublas_fc1=round(today["fc1"] / ms, 3))
            if gelu_fp8 not in best or ms < best[gelu_fp8][0]:
                best[gelu_fp8] = (ms, tile)

    # fc2 on the epilogue's block-scaled activation
    fc2_block = triton_fc2_block = None
    if True in best:
        e8, e_scale = triton_fp8_gemm(a8, a_scale, w1_8, w1_scale, best[True][1], True)
        for label, w, w_scale_blocks, recipe in blockwise_fc2_candidates(w2):
            name = f"cuBLAS fc2, A 1x128 blocks, {label}"
            try:

                def fc2(w=w, w_scale_blocks=w_scale_blocks, recipe=recipe):
                    return scaled_mm(e8, w.t(), e_scale, scaling("Blockwise_1x128"), w_scale_blocks, recipe, output_dtype=torch.bfloat16)

                y = fc2()
                ms = median_ms(fc2, [()])
            except Exception as error:
                row(name, None, error=f"{type(error).__name__}: {str(error)[:200]}")
                continue
            row(name, ms, error_vs_fp32=relative_error(y, reference_y), of_rowwise_fc2=round(today["fc2"] / ms, 3))
            fc2_block = ms if fc2_block is None else min(fc2_block, ms)
        # the same fc2 in Triton, the block scales applied per 128-wide K step (cuBLAS's block-scaled
        # GEMM ran at 92% of its row-wise one on the H200, 2026-12-06)
        for tile in (tile for tile in TILES if tile[2] == BLOCK_SCALE):
            name = f"Triton fc2, A 1x128 blocks in the K loop, B row-wise, tile {tile}"
            try:
                y = triton_fp8_gemm(e8, e_scale.t(), w2_8, w2_scale, tile, False, a_blocks=True)
                ms = median_ms(lambda: triton_fp8_gemm(e8, e_scale.t(), w2_8, w2_scale, tile, False, a_blocks=True), [()])
            except Exception as error:
                row(name, None, error=f"{type(error).__name__}: {str(error)[:200]}")
                continue
            row(name, ms, error_vs_fp32=relative_error(y, reference_y), of_rowwise_fc2=round(today["fc2"] / ms, 3))
            triton_fc2_block = ms if triton_fc2_block is None else min(triton_fc2_block, ms)

    totals = {"today_ms": round(sum(today.values()), 4)}
    for label, fc2_ms in (("", fc2_block), ("_triton_fc2", triton_fc2_block)):
        if True in best and fc2_ms is not None:
            totals[f"epilogue{label}_ms"] = round(best[True][0] + fc2_ms, 4)
            totals[f"saving{label}_per_mlp_us"] = round((totals["today_ms"] - totals[f"epilogue{label}_ms"]) * 1e3, 1)
    if False in best:
        totals["best_triton_plain_of_cublas"] = round(today["fc1"] / best[False][0], 3)
    return rows, totals


def run(out: Path, token_counts: list[int]) -> dict:
    rows, totals = [], {}
    for tokens in token_counts:
        mlp_rows, totals[tokens] = measure_mlp(tokens)
        rows += mlp_rows
    for label in ("", "_triton_fc2"):  # what one step would save, where every MLP size was measured
        key = f"saving{label}_per_mlp_us"
        if set(MLPS_PER_STEP) <= set(totals) and all(key in totals[tokens] for tokens in MLPS_PER_STEP):
            step_us = sum(count * totals[tokens][key] for tokens, count in MLPS_PER_STEP.items())
            totals[f"saving{label}_per_step_ms"] = round(step_us / 1e3, 2)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"tokens": token_counts, "width": WIDTH, "mlp": MLP},
    }
    result = {"meta": meta, "rows": rows, "totals": totals}
    out.mkdir(parents=True, exist_ok=True)
    (out / "epilogue_lab.json").write_text(json.dumps(result, indent=2))
    (out / "epilogue_lab.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"Epilogue lab on {meta['device']} ({meta['date']}, torch {meta['torch']}, triton {meta['triton']}); "
        f"one MLP (token rows x {meta['shape']['width']} -> {meta['shape']['mlp']} -> {meta['shape']['width']}) of each size",
        "",
        "| tokens | piece | ms | TFLOP/s | other |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        other = ", ".join(f"{k}: {v}" for k, v in r.items() if k not in ("tokens", "piece", "ms", "tflop_s"))
        lines.append(f"| {r['tokens']} | {r['piece']} | {r['ms']} | {r['tflop_s']} | {other} |")
    lines += ["", f"Totals: {result['totals']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/epilogue-lab"))
    sizes = ",".join(map(str, MLPS_PER_STEP))
    parser.add_argument("--tokens", default=sizes, help="token rows of the MLPs measured, comma-separated (default: a step's three sizes)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("the epilogue lab needs a Hopper (or newer) GPU: FP8 tensor cores and TMA")
    print(markdown(run(args.out, [int(count) for count in args.tokens.split(",")])))


if __name__ == "__main__":
    main()
