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

The Triton GEMM is the mlp_epilogue stage's kernel (stages/kernels/gemm_epilogue.py: a plain
persistent TMA kernel; no warp specialisation, which Triton 3.6 offers on Blackwell only), swept
over a few tile shapes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path

import torch
import triton

from benchmarks.fused_kernels import median_ms, quantize_rows
from stages.kernels.gemm_epilogue import BLOCK_COLUMNS, launch_gemm
from stages.kernels.rows_fp8 import FP8, FP8_MAX

WIDTH, MLP = 3072, 12288
# The MLPs of one step at 1024x1024, by token rows: 38 single blocks (512 text + 8192 image tokens),
# 19 double blocks' image streams and 19 text streams. (A single block's fc2 is proj_out, whose K is
# 15360 with the attention output; the lab's fc2 stands in for it.)
MLPS_PER_STEP = {8704: 38, 8192: 19, 512: 19}
BLOCK_SCALE = BLOCK_COLUMNS  # columns per scale in the epilogue's output (cuBLAS's 1x128 recipe)
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
TILES = ((128, 256, 128, 3, 8), (128, 256, 64, 4, 8), (128, 128, 128, 4, 8), (128, 128, 128, 4, 4), (128, 128, 64, 5, 4))


def triton_fp8_gemm(a8, a_scale, w8, w_scale, tile, gelu_fp8: bool, a_blocks: bool = False):
    """The stage's persistent GEMM (stages/kernels/gemm_epilogue.py) at one tile shape, no bias: a8
    (M, K) e4m3 with (M,) scales (a_blocks: (K / 128, M) contiguous), w8 (N, K) e4m3 with (N,) scales.
    Returns bf16 C, or (gelu_fp8) the e4m3 GELU and its scales as (M, N / 128)."""
    (m, _), n = a8.shape, w8.shape[0]
    if gelu_fp8:
        out = torch.empty(m, n, device=a8.device, dtype=FP8)
        out_scale = torch.empty(n // BLOCK_SCALE, m, device=a8.device, dtype=torch.float32)
    else:
        out, out_scale = torch.empty(m, n, device=a8.device, dtype=torch.bfloat16), None
    launch_gemm(a8, a_scale, w8, w_scale, None, out, out_scale, a_blocks=a_blocks, gelu_fp8=gelu_fp8, tile=tile)
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
