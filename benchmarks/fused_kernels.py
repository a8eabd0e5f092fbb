"""Each fused kernel (stages/kernels/) against its eager reference, the same reference compiled by
Inductor (how the stack ran this work before), and its memory time: the bytes the kernel must move
over the device-to-device copy bandwidth measured in the same run. FLUX's shapes for a 1024x1024
edit (512 text + 8192 image tokens, width 3072, MLP 12288, 24 heads of 128).

    python -m benchmarks.fused_kernels --out DIR        # GPU with FP8 tensor cores; about a minute

Writes fused_kernels.json and fused_kernels.md into DIR and prints the table. Each timing is the
median of CUDA-event-timed calls that rotate over three input sets (inputs of 50-200 MB, so the 50-60
MB L2 cannot hold one call's data for the next).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

TEXT, IMAGE, C, M, HEADS, DIM = 512, 8192, 3072, 12288, 24, 128
DEVICE = "cuda"
TOKENS = TEXT + IMAGE
FP8 = torch.float8_e4m3fn


def quantize_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's dynamic row-wise activation quantization, as the FP8 Linears run it."""
    scale = y.abs().amax(dim=-1, keepdim=True).float() / 448.0
    return (y.float() / scale).clamp(-448.0, 448.0).to(FP8), scale


def median_ms(fn: Callable, inputs: list[tuple], repeats: int = 20) -> float:
    """Milliseconds per call: the calls over every input set captured in one CUDA graph, its replays
    timed with CUDA events (launch overhead out: in the stack these run under CUDA graphs too)."""
    for args in inputs:  # warm-up: compiles and autotunes outside the capture
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in inputs:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(inputs))
    return statistics.median(times)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy, bytes read plus bytes written per second, timed eagerly: captured in a
    CUDA graph the copy becomes a memcpy node that the copy engines run (2.7 TB/s on an H200, where
    the SMs copy at 4.2)."""
    from engine.benchmark.roofline import measure_copy_bandwidth

    return measure_copy_bandwidth()


def _bf16(*shape, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(torch.bfloat16)


def cases() -> list[dict]:
    """(name, bytes, fused call, eager reference, inputs); references use diffusers' own modules."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    from stages.attention_kernels import quantize_qkv_fp8
    from stages.fast_gelu import gelu_tanh_via_sigmoid
    from stages.kernels import heads as _heads  # noqa: F401  (registers the ops)
    from stages.kernels import rows_fp8 as _rows  # noqa: F401
    from stages.kernels.gemm_epilogue import launch_blocks_fp8

    ops = torch.ops.kontext

    def modulation():
        emb = _bf16(1, 6 * C, scale=0.3)
        return emb[:, :C], emb[:, C : 2 * C], emb[:, 2 * C : 3 * C]

    def norm_ref(x, shift, scale):
        return quantize_rows(F.layer_norm(x, (C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])

    def residual_ref(x, a, gate, shift, scale):
        h = x + gate[:, None] * a
        return (h, *quantize_rows(F.layer_norm(h, (C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]))

    def single_norm_ref(text, image, shift, scale):
        return norm_ref(torch.cat([text, image], dim=1), shift, scale)

    q_norms = [RMSNorm(DIM, eps=1e-6).to(DEVICE, torch.bfloat16) for _ in range(4)]
    for norm in q_norms:
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    bounds = [n.weight.abs().max().float().reshape(1) * DIM**0.5 for n in q_norms[:2]]
    descales = [(bound / 448).reshape(1, 1).expand(1, HEADS).contiguous() for bound in bounds]
    weights = [n.weight for n in q_norms]
    angles = torch.rand(TOKENS, DIM // 2, device=DEVICE) * 6.28
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)

    def heads_ref(text_qkv, image_qkv, fp8: bool):
        def split(x, norms):
            q, k, v = (t.unflatten(-1, (HEADS, DIM)) for t in x.unsqueeze(0).chunk(3, dim=-1))
            return norms[0](q), norms[1](k), v

        tq, tk, tv = split(text_qkv, q_norms[:2])
        iq, ik, iv = split(image_qkv, q_norms[2:])
        q = apply_rotary_emb(torch.cat([tq, iq], 1), (cos, sin), sequence_dim=1)
        k = apply_rotary_emb(torch.cat([tk, ik], 1), (cos, sin), sequence_dim=1)
        v = torch.cat([tv, iv], 1)
        return quantize_qkv_fp8(q, k, v, *bounds) if fp8 else (q, k, v)

    def fused_heads(text_qkv, image_qkv, fp8: bool):
        sources = [(x[:, :C], x[:, C : 2 * C], x[:, 2 * C :]) for x in (text_qkv, image_qkv)]
        if fp8:
            return ops.qk_norm_rope_fp8(*sources[0], *sources[1], *weights, cos, sin, *descales, 1, HEADS, 1e-6)
        return ops.qk_norm_rope(*sources[0], *sources[1], *weights, cos, sin, 1, HEADS, 1e-6)

    def blocks_fp8(a):
        out = torch.empty(a.shape, device=DEVICE, dtype=FP8)
        scales = torch.empty(C // 128, a.shape[0], device=DEVICE)
        launch_blocks_fp8(a, out, scales)
        return out.reshape(-1, 128), scales.t().reshape(-1, 1)

    sets = range(3)
    return [
        dict(
            name="LayerNorm + modulation -> FP8 (double block, image stream)",
            bytes=IMAGE * (3 * C + 4),
            fused=lambda x, s, c: ops.modulated_norm_fp8(x, None, s, c, 1e-6),
            reference=norm_ref,
            inputs=[(_bf16(1, IMAGE, C), *modulation()[:2]) for _ in sets],
        ),
        dict(
            name="LayerNorm + modulation -> FP8 over [text; image] (single block, no concat)",
            bytes=TOKENS * (3 * C + 4),
            fused=lambda t, i, s, c: ops.modulated_norm_fp8(t, i, s, c, 1e-6),
            reference=single_norm_ref,
            inputs=[(_bf16(1, TEXT, C), _bf16(1, IMAGE, C), *modulation()[:2]) for _ in sets],
        ),
        dict(
            name="gate x attention + residual, LayerNorm + modulation -> bf16 stream + FP8",
            bytes=IMAGE * (7 * C + 4),
            fused=lambda x, a, g, s, c: ops.residual_modulated_norm_fp8(x, a, g, s, c, 1e-6),
            reference=residual_ref,
            inputs=[(_bf16(1, IMAGE, C), _bf16(1, IMAGE, C), *modulation()) for _ in sets],
        ),
        dict(
            name="GELU -> FP8 (double block MLP, 12288 wide)",
            bytes=IMAGE * (3 * M + 4),
            fused=lambda m: ops.gelu_fp8(m),
            reference=lambda m: quantize_rows(gelu_tanh_via_sigmoid(m)),
            inputs=[(_bf16(IMAGE, M, scale=2),) for _ in sets],
        ),
        dict(
            name="[attention, GELU(mlp)] -> one FP8 row (single block, 15360 wide)",
            bytes=TOKENS * (3 * (C + M) + 4),
            fused=lambda a, m: ops.concat_gelu_fp8(a, m),
            reference=lambda a, m: quantize_rows(torch.cat([a.reshape(-1, C), gelu_tanh_via_sigmoid(m)], -1)),
            inputs=[(_bf16(1, TOKENS, C), _bf16(TOKENS, M, scale=2)) for _ in sets],
        ),
        dict(
            # the mlp_epilogue option: the single blocks' attention part of proj_out's row, in 1x128 blocks
            # (the GELU part is written by the MLP GEMM's epilogue; benchmarks/epilogue_lab.py times that)
            name="attention output -> FP8 in 1x128 blocks (single block, MLP epilogue)",
            bytes=TOKENS * (3 * C + 4 * C // 128),
            fused=blocks_fp8,
            reference=lambda a: quantize_rows(a.reshape(-1, 128)),
            inputs=[(_bf16(TOKENS, C),) for _ in sets],
        ),
        dict(
            name="attention output -> FP8, text rows first (double block)",
            bytes=TOKENS * (3 * C + 4),
            fused=lambda a: ops.rowwise_fp8(a, TEXT),
            reference=lambda a: (quantize_rows(a[:, :TEXT]), quantize_rows(a[:, TEXT:])),
            inputs=[(_bf16(1, TOKENS, C),) for _ in sets],
        ),
        dict(
            name="q/k RMSNorm + RoPE -> FP8 q, k, v with scales (FP8 attention)",
            bytes=TOKENS * 11 * C,
            fused=lambda t, i: fused_heads(t, i, True),
            reference=lambda t, i: heads_ref(t, i, True),
            inputs=[(_bf16(TEXT, 3 * C), _bf16(IMAGE, 3 * C)) for _ in sets],
        ),
        dict(
            name="q/k RMSNorm + RoPE -> bf16 q, k, v (bf16 attention)",
            bytes=TOKENS * 12 * C,
            fused=lambda t, i: fused_heads(t, i, False),
            reference=lambda t, i: heads_ref(t, i, False),
            inputs=[(_bf16(TEXT, 3 * C), _bf16(IMAGE, 3 * C)) for _ in sets],
        ),
    ]


def agreement(fused_out, reference_out) -> float | None:
    """Fraction of equal e4m3 codes between the fused and the eager outputs (their FP8 tensors, in order)."""
    fused_codes = [t.reshape(-1).view(torch.uint8) for t in _flatten(fused_out) if t.dtype == FP8]
    reference_codes = [t.reshape(-1).view(torch.uint8) for t in _flatten(reference_out) if t.dtype == FP8]
    if not fused_codes:
        return None
    fused_codes, reference_codes = torch.cat(fused_codes), torch.cat(reference_codes)
    if fused_codes.numel() != reference_codes.numel():
        return None
    return round((fused_codes == reference_codes).float().mean().item(), 5)


def _flatten(value):
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, torch.Tensor):
        yield value


def kernel_breakdown(fn: Callable, args: tuple) -> dict[str, float]:
    """Device microseconds of each kernel one call launches (torch.profiler), launch gaps left out."""
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or 0
        if device_us > 0:
            times[event.key[:60]] = round(times.get(event.key[:60], 0.0) + device_us, 1)
    return times


def sweep() -> list[dict]:
    """Each kernel's time under other launch options than launch_options' choice (writing e4m3 into
    buffers made once), to check that choice on this GPU."""
    from stages.kernels import heads, rows_fp8

    def fp8(rows, width):
        return torch.empty(rows, width, device=DEVICE, dtype=FP8), torch.empty(rows, device=DEVICE)

    norm = [(_bf16(1, IMAGE, C), None, _bf16(1, C), _bf16(1, C), 1e-6, *fp8(IMAGE, C)) for _ in range(3)]
    residual = [
        (_bf16(1, IMAGE, C), _bf16(1, IMAGE, C), _bf16(1, C), _bf16(1, C), _bf16(1, C), 1e-6, _bf16(1, IMAGE, C), *fp8(IMAGE, C))
        for _ in range(3)
    ]
    gelu = [(_bf16(IMAGE, M), *fp8(IMAGE, M)) for _ in range(3)]
    concat = [(_bf16(1, TOKENS, C), _bf16(TOKENS, M), *fp8(TOKENS, C + M)) for _ in range(3)]
    norms = tuple(_bf16(DIM) + 1 for _ in range(4))
    angles = torch.rand(TOKENS, DIM, device=DEVICE)
    descales = (torch.full((1, HEADS), 20.0 / 448, device=DEVICE), torch.full((1, HEADS), 20.0 / 448, device=DEVICE))

    def qkv(rows):
        x = _bf16(rows, 3 * C)
        return x[:, :C], x[:, C : 2 * C], x[:, 2 * C :]

    def head_outputs():
        return tuple(torch.empty(1, TOKENS, HEADS, DIM, device=DEVICE, dtype=FP8) for _ in range(3))

    attention = [(qkv(TEXT), qkv(IMAGE), head_outputs(), torch.zeros(1, HEADS, device=DEVICE)) for _ in range(3)]

    def timed(kernel: str, options: str, moved: int, launch: Callable, inputs: list[tuple]) -> dict:
        ms = median_ms(launch, inputs)
        return {"kernel": kernel, "options": options, "us": round(ms * 1e3, 1), "gbps": round(moved / ms / 1e6)}

    results = []
    norm_plans = [
        ("modulated_norm", IMAGE * 3 * C, rows_fp8.launch_modulated_norm, norm),
        ("residual_modulated_norm", IMAGE * 7 * C, rows_fp8.launch_residual_modulated_norm, residual),
    ]
    for name, moved, launch, inputs in norm_plans:
        for rows, warps in ((1, 2), (1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (2, 16), (4, 8), (4, 16), (8, 16)):
            options = {**rows_fp8.norm_options(C, rows), "num_warps": warps}
            results.append(timed(name, f"rows={rows}, num_warps={warps}", moved, lambda *args: launch(*args, options=options), inputs))

    def candidate(kernel: str, options: str, moved: int, launch: Callable, inputs: list[tuple]) -> dict:
        """A candidate kernel that does not build on this GPU is a row, not the end of the sweep."""
        try:
            return timed(kernel, options, moved, launch, inputs)
        except Exception as error:
            return {"kernel": kernel, "options": f"{options}: {type(error).__name__}: {str(error)[:120]}", "us": None, "gbps": None}

    # the chunked candidates: one row per program, walked in chunks (rows_fp8's *_chunked_kernel)
    for chunk, warps in ((512, 2), (512, 4), (1024, 4), (1024, 8), (2048, 8)):

        def chunked_norm(*args, chunk=chunk, warps=warps):
            rows_fp8.launch_modulated_norm_chunked(*args, chunk=chunk, num_warps=warps)

        results.append(candidate("modulated_norm", f"chunked: chunk={chunk}, num_warps={warps}", IMAGE * 3 * C, chunked_norm, norm))
    for chunk, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8)):

        def chunked_concat(*args, chunk=chunk, warps=warps):
            rows_fp8.launch_concat_gelu_chunked(*args, chunk=chunk, num_warps=warps)

        label = f"chunked: chunk={chunk}, num_warps={warps}"
        results.append(candidate("concat_gelu", label, TOKENS * 3 * (C + M), chunked_concat, concat))
    gelu_plans = [
        ("gelu", IMAGE * 3 * M, rows_fp8.launch_gelu, gelu),
        ("concat_gelu", TOKENS * 3 * (C + M), rows_fp8.launch_concat_gelu, concat),
    ]
    for name, moved, launch, inputs in gelu_plans:
        for warps, fast_tanh in ((4, False), (8, False), (16, False), (4, True), (8, True), (16, True)):
            label = f"num_warps={warps}, {'tanh.approx' if fast_tanh else 'exp + division'}"
            results.append(timed(name, label, moved, lambda *args: launch(*args, num_warps=warps, fast_tanh=fast_tanh), inputs))
        one_block = {"CHUNK": __import__("triton").next_power_of_2(M), "PARTS": 1}  # one masked block instead of parts
        results.append(timed(name, "num_warps=8, one block", moved, lambda *args: launch(*args, num_warps=8, parts=one_block), inputs))
    qk_options = [(None, 1, 2), (None, 2, 2), (8, 1, 1), (8, 1, 2), (8, 2, 2), (8, 2, 4), (8, 4, 4), (4, 2, 1), (4, 4, 2)]
    for heads_per_program, rows_per_program, warps in qk_options:

        def launch(text, image, outputs, v_amax):
            heads.launch_qk_norm_rope(
                text, image, 1, HEADS, norms, angles, angles, 1e-6, *outputs, descales, v_amax,
                rows_per_program=rows_per_program, num_warps=warps, heads_per_program=heads_per_program,
            )  # fmt: skip

        label = f"heads per program={heads_per_program or 'all'}, rows={rows_per_program}, num_warps={warps}"
        results.append(timed("qk_norm_rope (FP8, without the V cast)", label, TOKENS * 8 * C, launch, attention))
    return results


def run(out: Path, with_sweep: bool = False, with_references: bool = True) -> dict:
    torch.manual_seed(0)
    rows = []
    copy_gbps = copy_bandwidth_gbps()
    for case in cases():
        fused_ms = median_ms(case["fused"], case["inputs"])
        eager_ms = inductor_ms = None
        if with_references:  # the eager reference and Inductor's compile of it (a minute or two in all)
            eager_ms = median_ms(case["reference"], case["inputs"])
            inductor_ms = median_ms(torch.compile(case["reference"], dynamic=False), case["inputs"])
        memory_ms = case["bytes"] / (copy_gbps * 1e9) * 1e3
        rows.append(
            {
                "kernel": case["name"],
                "bytes_mb": round(case["bytes"] / 1e6, 1),
                "fused_us": round(fused_ms * 1e3, 1),
                "fused_gbps": round(case["bytes"] / (fused_ms * 1e-3) / 1e9),
                "memory_time_us": round(memory_ms * 1e3, 1),
                "fused_over_memory_time": round(fused_ms / memory_ms, 2),
                "inductor_us": None if inductor_ms is None else round(inductor_ms * 1e3, 1),
                "eager_us": None if eager_ms is None else round(eager_ms * 1e3, 1),
                "speedup_vs_inductor": None if inductor_ms is None else round(inductor_ms / fused_ms, 2),
                "e4m3_codes_equal_to_eager": agreement(case["fused"](*case["inputs"][0]), case["reference"](*case["inputs"][0])),
                "fused_kernels_us": kernel_breakdown(case["fused"], case["inputs"][0]),
            }
        )
        torch._dynamo.reset()
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_bandwidth_gbps": round(copy_gbps),
        "shapes": {"text": TEXT, "image": IMAGE, "width": C, "mlp": M, "heads": HEADS, "head_dim": DIM},
    }
    result = {"meta": meta, "rows": rows, "sweep": sweep() if with_sweep else []}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_kernels.json").write_text(json.dumps(result, indent=2))
    (out / "fused_kernels.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    meta = result["meta"]
    head = [
        "kernel",
        "MB moved",
        "fused us",
        "GB/s",
        "memory time us",
        "fused / memory",
        "Inductor us",
        "eager us",
        "x vs Inductor",
        "e4m3 = eager",
    ]
    keys = ["kernel", "bytes_mb", "fused_us", "fused_gbps", "memory_time_us", "fused_over_memory_time", "inductor_us", "eager_us",
            "speedup_vs_inductor", "e4m3_codes_equal_to_eager"]  # fmt: skip
    lines = [
        f"Fused kernels on {meta['device']} ({meta['date']}, torch {meta['torch']}, triton {meta['triton']}); "
        f"copy bandwidth measured in this run: {meta['copy_bandwidth_gbps']} GB/s",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in result["rows"]:
        lines.append("| " + " | ".join("-" if row[key] is None else str(row[key]) for key in keys) + " |")
    lines += ["", "Kernels each fused call launched (profiler, device us):", ""]
    lines += [f"- {row['kernel']}: {row['fused_kernels_us']}" for row in result["rows"]]
    if result.get("sweep"):
        lines += ["", "Launch options (us, GB/s):", "", "| kernel | options | us | GB/s |", "|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['options']} | {r['us']} | {r['gbps']} |" for r in result["sweep"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for fused_kernels.json and fused_kernels.md")
    parser.add_argument("--sweep", action="store_true", help="also time each kernel under other launch options")
    parser.add_argument("--no-references", action="store_true", help="time the fused kernels only (no eager or Inductor reference)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")
    print(markdown(run(args.out, args.sweep, not args.no_references)))


if __name__ == "__main__":
    main()
