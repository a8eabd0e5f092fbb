"""FP8 GEMMs with the MLP's glue in their epilogue: GELU -> e4m3 written by fc1, read by fc2 as it is.

Without this, each large MLP of a step (fc1 12288 wide, then fc2) writes fc1's bf16 output
(tokens x 12288 x 2 B: 214 MB at 8704 tokens), reads it again to apply GELU and quantize it row-wise
(rows_fp8.gelu_fp8 / concat_gelu_fp8), writes the e4m3 rows, and only then runs fc2. A row-wise
scale needs the maximum of the whole 12288-wide row, which spans many output tiles of fc1, so it
cannot be computed in fc1's epilogue. One scale per row per 128 columns can: each output tile owns
its 128-column groups. So here:

    fp8_gemm_gelu_blocks   fc1 with bias, GELU and e4m3 with one scale per row per 128 columns in
                           its epilogue (the bf16 activation is never written); for the single
                           blocks it also writes their attention output, in the same 1x128 blocks,
                           into the columns before the MLP's, so that proj_out reads one row of
                           [attention, GELU(mlp)] with no concatenation pass
    fp8_gemm_a_blocks_gated_residual
                           fc2 / proj_out on those activations: each 128-wide K step's partial
                           product is scaled by its rows' scales before it is added (the weight
                           keeps torchao's row-wise scales, constant along K, applied at the end),
                           and the epilogue writes the block's new residual stream x + gate * output
                           (x read from the text and image halves where the block has two), so the
                           bf16 output and Inductor's add kernel over it are gone

Both are one persistent Triton kernel (TMA loads, 128 x 256 x 128 tiles), the technique of Triton's
persistent-matmul tutorial. Measured on an H200 (benchmarks/epilogue_lab.py, 2026-12-06): the plain
form at 98.9-99.6% of cuBLAS's row-wise FP8 GEMM at fc1's shape, with the GELU -> e4m3 epilogue at
97.3-98.6%. Block scales are applied as DeepSeek's 1x128 recipe does; they follow the values more
closely than one scale per 12288 columns (fc2's error against fp32: 0.0528 vs 0.0538).

Scales of a block-scaled activation are stored (columns / 128, rows): the scales of one 128-column
group of every row are contiguous, as the K loop reads them (and as cuBLAS takes 1x128 scales).

Hopper or newer (TMA). In Triton's CPU interpreter the kernels run as written (the tests), with the
e4m3 output in float32 cast by torch afterwards, as in rows_fp8.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .rows_fp8 import _FP8_MAX, _MIN_AMAX, FAST_TANH, _gelu_tanh, _halves, _tanh_instruction, _tile_rows, as_e4m3, concrete, e4m3_buffer

BLOCK_COLUMNS = 128  # columns per scale of a block-scaled activation, and the K step that applies them
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). The fc1 tile is the epilogue lab's fastest on an H200
# (2026-12-06); fc2's K step must be BLOCK_COLUMNS wide to apply one scale per step.
FC1_TILE = (128, 256, 128, 3, 8)
FC2_TILE = (128, 256, 128, 3, 8)
GROUP_M = 8  # output tile rows per group in the persistent order: a wave rereads A's rows from L2
LEAD_ROWS, LEAD_GROUPS = 32, 4  # the lead part's quantization: 32 rows x 4 column groups per program


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, a_stride, b_ptr, b_stride, a_scale_ptr, a_scale_stride, b_scale_ptr, bias_ptr, c_ptr, c_stride, c_column, c_scale_ptr, M, N, K,
    head_ptr, head_sb, head_ss, tail_ptr, tail_sb, tail_ss, seq, split, gate_ptr, gate_sb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, NUM_SMS: tl.constexpr,
    A_BLOCKS: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_FP8: tl.constexpr, FAST_TANH: tl.constexpr,
    GATED_RESIDUAL: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C = (A @ B^T) * a_scale * b_scale[col] (+ bias[col]), persistent over output tiles.

    A_BLOCKS: A's scales are (K / BLOCK_K, M) with row stride a_scale_stride, one per row per K step,
    applied to each step's partial product; else one per row. GELU_FP8: C is e4m3(GELU(C)) with one
    scale per row per 128 columns, stored at c_scale_ptr[group * M + row]; else bf16 C. C's columns
    start at c_column of a buffer with row stride c_stride (and its scales at group c_column / 128).
    GATED_RESIDUAL (bf16 C): C = residual + gate[batch] * C, the residual's rows of each batch of `seq`
    tokens read from head (tokens [0, split)) and tail (the rest), as the row kernels read two halves."""
    # TMA descriptors made on the device: the custom ops then take plain tensors, which Inductor's
    # tracing of a triton_op can pass (host-side descriptors it cannot: see use_torch_allocator)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[a_stride, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[b_stride, 1], block_shape=[BLOCK_N, BLOCK_K])
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * tiles_n
    for tile in range(pid, tiles_m * tiles_n, NUM_SMS):
        # grouped order: consecutive tiles share B's columns, so a wave of programs rereads A from L2
        group = tile // per_group
        first_m = group * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        off_m = (first_m + tile % group_m) * BLOCK_M
        off_n = ((tile % per_group) // group_m) * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(k_steps, num_stages=STAGES):
            a = a_desc.load([off_m, k * BLOCK_K])
            b = b_desc.load([off_n, k * BLOCK_K])
            if A_BLOCKS:
                step_scale = tl.load(a_scale_ptr + k * a_scale_stride + rows, mask=row_ok, other=0.0)
                acc += tl.dot(a, b.T) * step_scale[:, None]
            else:
                acc = tl.dot(a, b.T, acc)
        if not A_BLOCKS:
            acc = acc * tl.load(a_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
        col_ok = cols < N
        acc = acc * tl.load(b_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        c_rows = c_ptr + rows.to(tl.int64)[:, None] * c_stride + c_column  # 64-bit: rows x 15360 passes 2^31 at 140k rows
        if GELU_FP8:
            y = tl.reshape(_gelu_tanh(acc, FAST_TANH), (BLOCK_M, BLOCK_N // 128, 128))
            amax = tl.maximum(tl.max(tl.abs(y), axis=2), _MIN_AMAX)  # (BLOCK_M, BLOCK_N / 128)
            q = tl.reshape(tl.clamp(y * (_FP8_MAX / amax[:, :, None]), -_FP8_MAX, _FP8_MAX), (BLOCK_M, BLOCK_N))
            tl.store(c_rows + cols[None, :], q.to(c_ptr.dtype.element_ty), mask=mask)
            groups = off_n // 128 + tl.arange(0, BLOCK_N // 128)
            group_ok = groups * 128 < N
            scales = c_scale_ptr + (c_column // 128 + groups[None, :]) * M + rows[:, None]
            tl.store(scales, amax / _FP8_MAX, mask=row_ok[:, None] & group_ok[None, :])
        else:
            if GATED_RESIDUAL:
                batch, token = rows.to(tl.int64) // seq, rows.to(tl.int64) % seq
                starts = _tile_rows(token, batch, split, head_ptr, head_sb, head_ss, tail_ptr, tail_sb, tail_ss)
                residual = tl.load(starts[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                gate = tl.load(gate_ptr + batch[:, None] * gate_sb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                acc = residual + gate * acc
            tl.store(c_rows + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blocks_fp8_kernel(a_ptr, a_stride, out_ptr, out_stride, scale_ptr, M, ROWS: tl.constexpr, GROUPS: tl.constexpr):
    """e4m3 of a bf16 (M, width) with one scale per row per 128 columns: ROWS rows x GROUPS groups."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    for g in tl.static_range(GROUPS):
        group = tl.program_id(1) * GROUPS + g
        cols = group * 128 + tl.arange(0, 128)
        x = tl.load(a_ptr + rows[:, None] * a_stride + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), _MIN_AMAX)
        q = tl.clamp(x * (_FP8_MAX / amax[:, None]), -_FP8_MAX, _FP8_MAX)
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(scale_ptr + group * M + rows, amax / _FP8_MAX, mask=row_ok)


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def use_torch_allocator() -> None:
    """Give Triton the global scratch that device-side TMA descriptors need at launch, from torch's
    caching allocator (under CUDA graph capture: the graph's pool).

    Why the descriptors are made on the device: Inductor traces a `triton_op` without Dynamo, and
    that tracing does not capture host-side `TensorDescriptor`s (torch's triton_kernel_wrap.py: "TMA
    descriptor capturing not yet supported in non-dynamo tracing"). A host-side descriptor became a
    constant argument holding its trace-time tensor, and the compile failed (H100, 2026-12-07:
    benchmarks/results/nvidia-h100-80gb-hbm3-2026-12-07). Triton keeps the allocator in a ContextVar,
    which each thread starts without: eager launches set it here, and compiled code, which launches
    the kernel without this function, runs after stages/mlp_epilogue.py's pre-hook on the
    transformer has set it on the thread that runs the step."""
    triton.set_allocator(_tma_scratch)


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def launch_gemm(
    a8,
    a_scale,
    w8,
    w_scale,
    bias,
    out,
    out_scale,
    *,
    a_blocks: bool,
    gelu_fp8: bool,
    out_column: int = 0,
    residual: tuple | None = None,
    tile=None,
    fast_tanh: bool = FAST_TANH,
):
    """out[:, out_column:][:, :N] = a8 @ w8^T, scaled, bias added; written as bf16 or (gelu_fp8)
    block-scaled e4m3 with its scales in out_scale ((columns / 128, rows), from group out_column / 128).
    a8 (rows, K) e4m3, w8 (N, K) e4m3 with (N,) scales; a_scale (rows,), or (K / 128, rows) with
    a_blocks. out: contiguous, (rows, columns) or (batch, tokens, columns). The offset, not a column
    view of `out`, keeps the custom op free of mutated views, which functionalization would copy.
    residual (bf16 out only): (head, tail or None, gate), and out is concat(head, tail) along tokens +
    gate[batch] * the product (head, tail: (batch, tokens, N) views with contiguous rows; gate: (batch, N))."""
    block_m, block_n, block_k, stages, warps = tile or (FC2_TILE if a_blocks else FC1_TILE)
    (m, k), n = a8.shape, w8.shape[0]
    sms = _multiprocessors(a8.device)
    if residual is not None:
        head, tail, gate = residual
        tail, _, seq, split, _ = _halves(head, tail)
        residual_args = (head, head.stride(0), head.stride(1), tail, tail.stride(0), tail.stride(1), seq, split, gate, gate.stride(0))
    else:  # never read: any pointer will do
        residual_args = (w_scale, 0, 0, w_scale, 0, 0, 1, 1, w_scale, 0)
    # one program per multiprocessor, whatever the row count: programs with no tile return at once,
    # and the grid stays a constant under dynamic sequence lengths
    use_torch_allocator()
    wrap_triton(_fp8_gemm_kernel)[(sms,)](
        a8, a8.stride(0), w8, w8.stride(0),
        a_scale, a_scale.stride(0) if a_blocks else 0, w_scale, bias if bias is not None else w_scale,
        out, out.stride(-2), out_column, out_scale if out_scale is not None else w_scale, m, n, k, *residual_args,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, NUM_SMS=sms, A_BLOCKS=a_blocks,
        HAS_BIAS=bias is not None, GELU_FP8=gelu_fp8, FAST_TANH=_tanh_instruction(fast_tanh),
        GATED_RESIDUAL=residual is not None, GROUP_M=GROUP_M, num_warps=warps,
    )  # fmt: skip


def launch_blocks_fp8(a, out, out_scale) -> None:
    """The first `width` columns of out = e4m3 of a (rows, width) bf16 in 1x128 blocks, their scales in
    the first width / 128 rows of out_scale (columns / 128, rows)."""
    m, width = a.shape
    groups = width // BLOCK_COLUMNS
    per_program = LEAD_GROUPS if groups % LEAD_GROUPS == 0 else 1
    wrap_triton(_blocks_fp8_kernel)[(triton.cdiv(m, LEAD_ROWS), groups // per_program)](
        a, a.stride(0), out, out.stride(0), out_scale, m, ROWS=LEAD_ROWS, GROUPS=per_program, num_warps=4
    )


def _check_blocks(*widths: int) -> None:
    for width in widths:
        if width % BLOCK_COLUMNS:
            raise ValueError(f"block-scaled FP8 needs widths that are multiples of {BLOCK_COLUMNS}, got {width}")


@triton_op("kontext::fp8_gemm_gelu_blocks", mutates_args=())
def fp8_gemm_gelu_blocks(
    x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, lead: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 of [lead, GELU(x8 @ w8^T * scales + bias)] in 1x128 blocks and its ((C + N) / 128, rows)
    scales; lead: None, or the (rows, C) bf16 that comes first (the single blocks' attention output)."""
    rows, n = x8.shape[0], w8.shape[0]
    lead_width = concrete(lead.shape[-1]) if lead is not None else 0  # the model's width: a constant (see concrete)
    _check_blocks(n, lead_width)
    out = e4m3_buffer(rows, lead_width + n, like=x8)
    out_scale = torch.empty((lead_width + n) // BLOCK_COLUMNS, rows, device=x8.device, dtype=torch.float32)
    if lead is not None:
        launch_blocks_fp8(lead.reshape(rows, lead_width), out, out_scale)
    launch_gemm(x8, x_scale, w8, w_scale, bias, out, out_scale, a_blocks=False, gelu_fp8=True, out_column=lead_width)
    return as_e4m3(out), out_scale


@triton_op("kontext::fp8_gemm_a_blocks_gated_residual", mutates_args=())
def fp8_gemm_a_blocks_gated_residual(
    x8: torch.Tensor,
    x_scales: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    head: torch.Tensor,
    tail: torch.Tensor | None,
    gate: torch.Tensor,
) -> torch.Tensor:
    """The block's new residual stream, (batch, tokens, N) bf16: concat(head, tail) along tokens +
    gate[batch] * (x8 @ w8^T with x8's (K / 128, rows) block scales and w8's (N,) row scales, + bias),
    in the GEMM's epilogue (the product is never written)."""
    _check_blocks(x8.shape[1])
    batch, tokens = head.shape[0], head.shape[1] + (tail.shape[1] if tail is not None else 0)
    out = torch.empty(batch, tokens, w8.shape[0], device=x8.device, dtype=torch.bfloat16)
    launch_gemm(x8, x_scales, w8, w_scale, bias, out, None, a_blocks=True, gelu_fp8=False, residual=(head, tail, gate))
    return out
