"""Row kernels: the elementwise stretches before each FP8 GEMM, ending in row-wise e4m3.

A row-wise FP8 GEMM (`torch._scaled_mm` with one scale per row of A) needs each row's absolute
maximum before any element of the row can be cast. Inductor therefore reads the row twice or splits
the work into a reduction kernel and a cast kernel. Here one program owns one token row, keeps it on
chip (3072, 12288 or 15360 values: at most 60 KB of fp32 in registers of 512 threads), computes its
prologue in fp32, reduces, and writes the e4m3 row and its scale (amax / 448) in the same pass.

Kernels (C = hidden width 3072, M = MLP width 12288; bytes per row, bf16 read = 2 B, e4m3 written
= 1 B, the 4-byte scale left out):

    modulated_norm_fp8           y = LN(x) * (1 + scale) + shift                     3C
                                 (AdaLN-Zero before attention and the single blocks' MLP; the
                                 single blocks' input is read from the text and image halves
                                 directly, so their concatenation is never written)
    residual_modulated_norm_fp8  h = x + gate * a  (h written in bf16),              7C
                                 y = LN(h) * (1 + scale) + shift
                                 (after the double blocks' attention: one read of the residual
                                 stream, the new stream and the MLP's FP8 input written together)
    gelu_fp8                     y = gelu_tanh(m)  (the double blocks' MLP)          3M
    concat_gelu_fp8              y = [a, gelu_tanh(m)]  (the single blocks'          3(C + M)
                                 attention output and MLP activation, one FP8 row for proj_out)
    rowwise_fp8                  y = a  (the double blocks' attention output,        3C
                                 written text rows first, so that to_add_out and to_out read
                                 contiguous halves)

Inputs are (batch, tokens, width) views whose last dimension is contiguous; rows are addressed
through their batch and token strides, so slices need no copy. Outputs are contiguous (rows, width).

LayerNorm is FLUX's AdaLN one (no affine, eps 1e-6); GELU is the tanh approximation, computed as
x * sigmoid(2z) (the same function, stages/fast_gelu.py says why it is cheaper). A zero row gets a
tiny scale instead of torchao's 0/0.

The launchers take their outputs as arguments: the custom ops pass e4m3 tensors; the CPU tests pass
float32 ones and cast with torch, because Triton's CPU interpreter rounds to e4m3 wrongly (it drops
the carry into the exponent: 126.8 became 64 with triton 3.6).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Kernels read globals only as constexprs.
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(1e-12)  # a zero row gets this amax: finite scale, zero output
_GELU_Z = tl.constexpr(math.sqrt(2.0 / math.pi))  # gelu_tanh(x) = 0.5 x (1 + tanh z) = x sigmoid(2 z)


def concrete(size) -> int:
    """A row width as a plain int. Under torch.compile the hidden width of `hidden_states` is still
    symbolic when these kernels are traced (the input is marked dynamic for its sequence, and the
    width becomes a constant only when it meets a GEMM's weight, later in the block), and
    next_power_of_2 of a symbol is a nest of bitwise sympy terms: simplifying `rows * block // 2048`
    took sympy 55-58 s per traced call on a CPU (measured 2026-12-06), and the H100's stack dumps of
    a cold compile sat there. The widths are the model's constants, so specialise them here: the
    guard that adds is the one the GEMM adds anyway."""
    return int(size)


def launch_options(width: int) -> dict:
    """Block and warps from the row length: a whole row per program. Measured on an H200
    (benchmarks/results/nvidia-h200-2026-12-04-fused/, `benchmarks/fused_kernels.py --sweep`): 4 warps
    for rows of 3072 (45 -> 39 us for 8192 rows), 8 for the 12288- and 15360-wide ones."""
    block = triton.next_power_of_2(concrete(width))
    return {"BLOCK": block, "num_warps": 4 if block <= 4096 else 8}


# Token rows per program of the LayerNorm kernels. One row per program reloads the modulation
# vectors (shift, scale, gate: 2-3 rows' worth of bytes, from L2) for every row it normalises, and
# each row's three reductions stall its program; ROWS rows of one batch share one load of the
# modulation and reduce together. Measured on an H200 (2026-12-05, --sweep): two rows with 4 warps
# 39.2 us against 44.1 for one row (LayerNorm + modulation, 8192 x 3072), 61.3 against 63.5 for the
# residual variant; four rows or 16 warps were slower (60-85 us).
NORM_ROWS = 2


def norm_options(width: int, rows: int = NORM_ROWS) -> dict:
    """Launch options of the LayerNorm kernels: ROWS token rows of BLOCK values per program."""
    block = triton.next_power_of_2(concrete(width))
    return {"BLOCK": block, "ROWS": rows, "num_warps": min(16, max(4, rows * block // 2048))}


# GELU's tanh as the GPU's tanh.approx instruction (see _gelu_tanh) instead of exp and a division.
# Measured on an H200 (2026-12-05): GELU -> FP8 of 8192 x 12288 in 93 us instead of 111, the single
# blocks' [attention, GELU] row in 141 instead of 169; the instruction's largest error on [-12, 0] was
# 7.6e-6 (it returns exactly -1 below z = -8), far under e4m3's rounding.
FAST_TANH = True


def _tanh_instruction(requested: bool) -> bool:
    """Inline PTX cannot run in Triton's CPU interpreter: there the exact form runs."""
    return requested and not triton.knobs.runtime.interpret


def gelu_parts(width: int) -> dict:
    """The GELU rows in (at most three) power-of-two parts: 12288 = 3 x 4096 wastes no lane, where
    one 16384 block would leave a quarter of them masked, and the GELU's arithmetic is a large
    share of these kernels' time."""
    width = concrete(width)
    chunk = triton.next_power_of_2(triton.cdiv(width, 3))
    return {"CHUNK": chunk, "PARTS": triton.cdiv(width, chunk)}


# -- shared pieces ---------------------------------------------------------------------------------


@triton.jit
def _tile_rows(s, b, split, head_ptr, head_sb, head_ss, tail_ptr, tail_sb, tail_ss):
    """Where the token rows `s` (a vector) of batch b start, when tokens [0, split) come from `head`
    and the rest from `tail` (the single blocks' text and image halves)."""
    head_rows = head_ptr + b * head_sb + s * head_ss
    tail_rows = tail_ptr + b * tail_sb + (s - split) * tail_ss
    return tl.where(s < split, head_rows, tail_rows)


@triton.jit
def _gelu_tanh(x, FAST_TANH: tl.constexpr):
    z = _GELU_Z * (x + 0.044715 * x * x * x)
    if FAST_TANH:
        # 0.5 x (1 + tanh z) with the GPU's one-instruction tanh: one special-function op per value
        # where the sigmoid form takes two (exp and a reciprocal). Measured on an H200: at most 7.6e-6
        # from tanh on [-12, 0] and exactly -1 below z = -8, so 1 + tanh z does not cancel into noise
        # and the GELU is off by at most 2^-17 |x|, far below the e4m3 step it is rounded to.
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=True, pack=1)
        half = 0.5 * x
        return half + half * t
    else:
        # x * sigmoid(2 z); the division need not be IEEE-rounded: its 2-ulp error is far below the
        # e4m3 step the result is rounded to next
        return tl.fdiv(x, 1.0 + tl.exp(-2.0 * z), ieee_rounding=False)


@triton.jit
def _gelu_part(m_row, start, width, CHUNK: tl.constexpr, FAST_TANH: tl.constexpr):
    offs = start + tl.arange(0, CHUNK)
    mask = offs < width
    y = _gelu_tanh(tl.load(m_row + offs, mask=mask, other=0.0).to(tl.float32), FAST_TANH)
    return y, offs, mask, _row_amax(y, mask)


@triton.jit
def _gelu_row_fp8(m_row, out_row, width, amax, CHUNK: tl.constexpr, PARTS: tl.constexpr, FAST_TANH: tl.constexpr):
    """GELU of one row of `width` values in up to three parts of CHUNK, each kept in registers until
    the row's amax (which starts from `amax`: the concatenation's other part) is known; then e4m3."""
    y0, offs0, mask0, amax0 = _gelu_part(m_row, 0, width, CHUNK, FAST_TANH)
    amax = tl.maximum(amax, amax0)
    if PARTS > 1:
        y1, offs1, mask1, amax1 = _gelu_part(m_row, CHUNK, width, CHUNK, FAST_TANH)
        amax = tl.maximum(amax, amax1)
    if PARTS > 2:
        y2, offs2, mask2, amax2 = _gelu_part(m_row, 2 * CHUNK, width, CHUNK, FAST_TANH)
        amax = tl.maximum(amax, amax2)
    _store_fp8(y0, amax, out_row, offs0, mask0)
    if PARTS > 1:
        _store_fp8(y1, amax, out_row, offs1, mask1)
    if PARTS > 2:
        _store_fp8(y2, amax, out_row, offs2, mask2)
    return amax


@triton.jit
def _modulated_layer_norm(x, mask, shift, scale, width, EPS: tl.constexpr):
    """Rows of x (ROWS, BLOCK) normalised along the last axis, then modulated."""
    mean = tl.sum(x, axis=1, keep_dims=True) / width
    centered = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1, keep_dims=True) / width + EPS)
    return centered * rstd * (1.0 + scale) + shift


@triton.jit
def _row_amax(y, mask):
    return tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=-1), _MIN_AMAX)


@triton.jit
def _store_fp8(y, amax, out_ptr, offs, mask):
    """e4m3 of y / (amax / 448), clamped (values at the bound can round past it)."""
    q = tl.clamp(y * (_FP8_MAX / amax), -_FP8_MAX, _FP8_MAX)
    tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=mask)


# -- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _modulated_norm_fp8_kernel(
    head_ptr, head_sb, head_ss, tail_ptr, tail_sb, tail_ss, seq, split,
    shift_ptr, shift_sb, scale_ptr, scale_sb,
    out_ptr, out_scale_ptr, width,
    EPS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # this program's tokens
    cols = tl.arange(0, BLOCK)
    mask = (s < seq)[:, None] & (cols < width)[None, :]
    rows = _tile_rows(s, b, split, head_ptr, head_sb, head_ss, tail_ptr, tail_sb, tail_ss)
    x = tl.load(rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * shift_sb + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + b * scale_sb + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
    y = _modulated_layer_norm(x, mask, shift, scale, width, EPS)
    amax = _row_amax(y, mask)
    out_rows = b * seq + s
    _store_fp8(y, amax[:, None], out_ptr + out_rows[:, None] * width, cols[None, :], mask)
    tl.store(out_scale_ptr + out_rows, amax / _FP8_MAX, mask=s < seq)


@triton.jit
def _modulate_chunk(row, shift_row, scale_row, cols, width, mean, rstd):
    mask = cols < width
    x = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_row + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_row + cols, mask=mask, other=0.0).to(tl.float32)
    return (x - mean) * rstd * (1.0 + scale) + shift


@triton.jit
def _modulated_norm_fp8_chunked_kernel(
    head_ptr, head_sb, head_ss, tail_ptr, tail_sb, tail_ss, seq, split,
    shift_ptr, shift_sb, scale_ptr, scale_sb,
    out_ptr, out_scale_ptr, width,
    EPS: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
):  # fmt: skip
    """The same function as _modulated_norm_fp8_kernel, one row per program, walked in CHUNK-wide
    pieces four times (sum, squared deviations, amax, store): the row comes from memory once and
    from the cache three times, and a program holds CHUNK values instead of the whole row, so more
    programs fit on an SM and more loads are in flight. A candidate the sweep measures (the whole-row
    kernel ran at 2.0x its memory time on an H200), not what the op runs."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    row = _tile_rows(s, b, split, head_ptr, head_sb, head_ss, tail_ptr, tail_sb, tail_ss)
    shift_row = shift_ptr + b * shift_sb
    scale_row = scale_ptr + b * scale_sb
    total = tl.zeros([CHUNK], dtype=tl.float32)
    for chunk in range(CHUNKS):
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        total += tl.load(row + cols, mask=cols < width, other=0.0).to(tl.float32)
    mean = tl.sum(total, axis=0) / width
    squares = tl.zeros([CHUNK], dtype=tl.float32)
    for chunk in range(CHUNKS):
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(row + cols, mask=cols < width, other=0.0).to(tl.float32)
        centered = tl.where(cols < width, x - mean, 0.0)
        squares += centered * centered
    rstd = tl.rsqrt(tl.sum(squares, axis=0) / width + EPS)
    peak = tl.zeros([CHUNK], dtype=tl.float32)
    for chunk in range(CHUNKS):
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        y = _modulate_chunk(row, shift_row, scale_row, cols, width, mean, rstd)
        peak = tl.maximum(peak, tl.where(cols < width, tl.abs(y), 0.0))
    amax = tl.maximum(tl.max(peak, axis=0), _MIN_AMAX)
    out_row = b * seq + s
    for chunk in range(CHUNKS):
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        y = _modulate_chunk(row, shift_row, scale_row, cols, width, mean, rstd)
        _store_fp8(y, amax, out_ptr + out_row * width, cols, cols < width)
    tl.store(out_scale_ptr + out_row, amax / _FP8_MAX)


@triton.jit
def _residual_modulated_norm_fp8_kernel(
    x_ptr, x_sb, x_ss, a_ptr, a_sb, a_ss, seq,
    gate_ptr, gate_sb, shift_ptr, shift_sb, scale_ptr, scale_sb,
    h_ptr, out_ptr, out_scale_ptr, width,
    EPS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < width
    mask = (s < seq)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + b * x_sb + s[:, None] * x_ss + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + b * a_sb + s[:, None] * a_ss + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_sb + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # The residual stream is bf16 between blocks: round it as it is stored and normalise the
    # rounded value, which is what the next reader of the stream sees.
    h = (x + gate * a).to(h_ptr.dtype.element_ty)
    out_rows = b * seq + s
    tl.store(h_ptr + out_rows[:, None] * width + cols[None, :], h, mask=mask)
    shift = tl.load(shift_ptr + b * shift_sb + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + b * scale_sb + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = _modulated_layer_norm(h.to(tl.float32), mask, shift, scale, width, EPS)
    amax = _row_amax(y, mask)
    _store_fp8(y, amax[:, None], out_ptr + out_rows[:, None] * width, cols[None, :], mask)
    tl.store(out_scale_ptr + out_rows, amax / _FP8_MAX, mask=s < seq)


@triton.jit
def _gelu_fp8_kernel(m_ptr, m_stride, out_ptr, out_scale_ptr, width, CHUNK: tl.constexpr, PARTS: tl.constexpr, FAST_TANH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = _gelu_row_fp8(m_ptr + row * m_stride, out_ptr + row * width, width, _MIN_AMAX, CHUNK, PARTS, FAST_TANH)
    tl.store(out_scale_ptr + row, amax / _FP8_MAX)


@triton.jit
def _concat_gelu_fp8_kernel(
    a_ptr, a_sb, a_ss, seq, m_ptr, m_stride, out_ptr, out_scale_ptr, a_width, m_width,
    A_BLOCK: tl.constexpr, CHUNK: tl.constexpr, PARTS: tl.constexpr, FAST_TANH: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    s = row % seq
    a_offs = tl.arange(0, A_BLOCK)
    a_mask = a_offs < a_width
    a = tl.load(a_ptr + b * a_sb + s * a_ss + a_offs, mask=a_mask, other=0.0).to(tl.float32)
    out_row = out_ptr + row * (a_width + m_width)
    # the GELU part first (it finds the amax of both parts), then the attention part with it
    amax = _gelu_row_fp8(m_ptr + row * m_stride, out_row + a_width, m_width, _row_amax(a, a_mask), CHUNK, PARTS, FAST_TANH)
    _store_fp8(a, amax, out_row, a_offs, a_mask)
    tl.store(out_scale_ptr + row, amax / _FP8_MAX)


@triton.jit
def _concat_gelu_fp8_chunked_kernel(
    a_ptr, a_sb, a_ss, seq, m_ptr, m_stride, out_ptr, out_scale_ptr, a_width, m_width,
    A_CHUNK: tl.constexpr, A_CHUNKS: tl.constexpr, M_CHUNK: tl.constexpr, M_CHUNKS: tl.constexpr, FAST_TANH: tl.constexpr,
):  # fmt: skip
    """The same function as _concat_gelu_fp8_kernel, walking the row in chunks twice: the amax
    pass, then the pass that recomputes the GELU and writes e4m3 (the MLP part is read twice, the
    second time from the cache). A candidate the sweep measures (the whole-row kernel ran at 1.47x
    its memory time on an H200), not what the op runs."""
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + (row // seq) * a_sb + (row % seq) * a_ss
    m_row = m_ptr + row * m_stride
    out_row = out_ptr + row * (a_width + m_width)
    a_peak = tl.zeros([A_CHUNK], dtype=tl.float32)
    for chunk in range(A_CHUNKS):
        cols = chunk * A_CHUNK + tl.arange(0, A_CHUNK)
        a_peak = tl.maximum(a_peak, tl.abs(tl.load(a_row + cols, mask=cols < a_width, other=0.0).to(tl.float32)))
    m_peak = tl.zeros([M_CHUNK], dtype=tl.float32)
    for chunk in range(M_CHUNKS):
        cols = chunk * M_CHUNK + tl.arange(0, M_CHUNK)
        y = _gelu_tanh(tl.load(m_row + cols, mask=cols < m_width, other=0.0).to(tl.float32), FAST_TANH)
        m_peak = tl.maximum(m_peak, tl.where(cols < m_width, tl.abs(y), 0.0))
    amax = tl.maximum(tl.maximum(tl.max(a_peak, axis=0), tl.max(m_peak, axis=0)), _MIN_AMAX)
    for chunk in range(A_CHUNKS):
        cols = chunk * A_CHUNK + tl.arange(0, A_CHUNK)
        a = tl.load(a_row + cols, mask=cols < a_width, other=0.0).to(tl.float32)
        _store_fp8(a, amax, out_row, cols, cols < a_width)
    for chunk in range(M_CHUNKS):
        cols = chunk * M_CHUNK + tl.arange(0, M_CHUNK)
        y = _gelu_tanh(tl.load(m_row + cols, mask=cols < m_width, other=0.0).to(tl.float32), FAST_TANH)
        _store_fp8(y, amax, out_row + a_width, cols, cols < m_width)
    tl.store(out_scale_ptr + row, amax / _FP8_MAX)


@triton.jit
def _rowwise_fp8_kernel(a_ptr, a_sb, a_ss, batch, seq, split, out_ptr, out_scale_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    s = row % seq
    offs = tl.arange(0, BLOCK)
    mask = offs < width
    y = tl.load(a_ptr + b * a_sb + s * a_ss + offs, mask=mask, other=0.0).to(tl.float32)
    # tokens [0, split) of every batch first, then the rest: two contiguous (rows, width) halves
    if s < split:
        out_row = b * split + s
    else:
        out_row = batch * split + b * (seq - split) + (s - split)
    amax = _row_amax(y, mask)
    _store_fp8(y, amax, out_ptr + out_row * width, offs, mask)
    tl.store(out_scale_ptr + out_row, amax / _FP8_MAX)


# -- launchers (outputs given: e4m3 from the ops, float32 from the CPU tests) ------------------------


def _check_rows(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        if tensor.dim() != 3 or tensor.stride(-1) != 1:
            raise ValueError(f"row kernels take (batch, tokens, width) views with a contiguous last dimension, not {tuple(tensor.shape)}")


def _halves(head, tail) -> tuple:
    """(tail, batch, seq, split, width) for the rows of concat(head, tail) along tokens (tail None:
    head alone, every row from head)."""
    tail = head[:, :0] if tail is None else tail
    _check_rows(head, tail)
    batch, split, width = head.shape
    seq = split + tail.shape[1]
    return tail, batch, seq, seq if tail.shape[1] == 0 else split, width


def launch_modulated_norm(head, tail, shift, scale, eps, out, out_scale, options: dict | None = None) -> None:
    """out[row] = e4m3(LN(x) * (1 + scale) + shift) for the rows of concat(head, tail) along tokens
    (tail None: head alone); shift and scale are (batch, width) views."""
    tail, batch, seq, split, width = _halves(head, tail)
    options = options or norm_options(width)
    wrap_triton(_modulated_norm_fp8_kernel)[(batch, triton.cdiv(seq, options["ROWS"]))](
        head, head.stride(0), head.stride(1), tail, tail.stride(0), tail.stride(1), seq, split,
        shift, shift.stride(0), scale, scale.stride(0), out, out_scale, width,
        EPS=eps, **options,
    )  # fmt: skip


def launch_modulated_norm_chunked(head, tail, shift, scale, eps, out, out_scale, chunk: int = 1024, num_warps: int = 4) -> None:
    """launch_modulated_norm's function through the chunked kernel (a sweep candidate)."""
    tail, batch, seq, split, width = _halves(head, tail)
    wrap_triton(_modulated_norm_fp8_chunked_kernel)[(batch, seq)](
        head, head.stride(0), head.stride(1), tail, tail.stride(0), tail.stride(1), seq, split,
        shift, shift.stride(0), scale, scale.stride(0), out, out_scale, width,
        EPS=eps, CHUNK=chunk, CHUNKS=triton.cdiv(concrete(width), chunk), num_warps=num_warps,
    )  # fmt: skip


def launch_residual_modulated_norm(x, a, gate, shift, scale, eps, h, out, out_scale, options: dict | None = None) -> None:
    """h = x + gate * a (bf16, rows contiguous); out = e4m3(LN(h) * (1 + scale) + shift)."""
    _check_rows(x, a)
    batch, seq, width = x.shape
    options = options or norm_options(width)
    wrap_triton(_residual_modulated_norm_fp8_kernel)[(batch, triton.cdiv(seq, options["ROWS"]))](
        x, x.stride(0), x.stride(1), a, a.stride(0), a.stride(1), seq,
        gate, gate.stride(0), shift, shift.stride(0), scale, scale.stride(0), h, out, out_scale, width,
        EPS=eps, **options,
    )  # fmt: skip


def launch_gelu(m, out, out_scale, num_warps: int = 8, parts: dict | None = None, fast_tanh: bool = FAST_TANH) -> None:
    """out = e4m3(gelu_tanh(m)) for a (rows, width) m with contiguous rows."""
    rows, width = m.shape
    parts = parts or gelu_parts(width)
    wrap_triton(_gelu_fp8_kernel)[(rows,)](
        m, m.stride(0), out, out_scale, width, **parts, FAST_TANH=_tanh_instruction(fast_tanh), num_warps=num_warps
    )


def launch_concat_gelu(a, m, out, out_scale, num_warps: int = 8, parts: dict | None = None, fast_tanh: bool = FAST_TANH) -> None:
    """out = e4m3([a, gelu_tanh(m)]) with one scale per row over both parts; a is (batch, tokens,
    C), m is (batch * tokens, M)."""
    _check_rows(a)
    batch, seq, a_width = a.shape
    m_width = m.shape[-1]
    wrap_triton(_concat_gelu_fp8_kernel)[(batch * seq,)](
        a, a.stride(0), a.stride(1), seq, m, m.stride(0), out, out_scale, a_width, m_width,
        A_BLOCK=triton.next_power_of_2(concrete(a_width)), **(parts or gelu_parts(m_width)),
        FAST_TANH=_tanh_instruction(fast_tanh), num_warps=num_warps,
    )  # fmt: skip


def launch_concat_gelu_chunked(a, m, out, out_scale, chunk: int = 2048, num_warps: int = 8, fast_tanh: bool = FAST_TANH) -> None:
    """launch_concat_gelu's function through the chunked kernel (a sweep candidate)."""
    _check_rows(a)
    batch, seq, a_width = a.shape
    a_width, m_width = concrete(a_width), concrete(m.shape[-1])
    a_chunk = min(chunk, triton.next_power_of_2(a_width))
    wrap_triton(_concat_gelu_fp8_chunked_kernel)[(batch * seq,)](
        a, a.stride(0), a.stride(1), seq, m, m.stride(0), out, out_scale, a_width, m_width,
        A_CHUNK=a_chunk, A_CHUNKS=triton.cdiv(a_width, a_chunk), M_CHUNK=chunk, M_CHUNKS=triton.cdiv(m_width, chunk),
        FAST_TANH=_tanh_instruction(fast_tanh), num_warps=num_warps,
    )  # fmt: skip


def launch_rowwise(a, split, out, out_scale, options: dict | None = None) -> None:
    """out = e4m3(a), tokens [0, split) of every batch first (split 0: natural order)."""
    _check_rows(a)
    batch, seq, width = a.shape
    wrap_triton(_rowwise_fp8_kernel)[(batch * seq,)](
        a, a.stride(0), a.stride(1), batch, seq, split, out, out_scale, width, **(options or launch_options(width))
    )


# -- custom ops --------------------------------------------------------------------------------------


def e4m3_buffer(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes e4m3: an e4m3 tensor, or, in Triton's CPU interpreter (whose e4m3
    rounding is wrong, see the module docstring), a float32 one that `as_e4m3` casts afterwards."""
    return torch.empty(*shape, device=like.device, dtype=torch.float32 if triton.knobs.runtime.interpret else FP8)


def as_e4m3(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == FP8 else tensor.to(FP8)


def _fp8_rows(rows: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return e4m3_buffer(rows, width, like=like), torch.empty(rows, device=like.device, dtype=torch.float32)


@triton_op("kontext::modulated_norm_fp8", mutates_args=())
def modulated_norm_fp8(
    head: torch.Tensor, tail: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = head.shape[0] * (head.shape[1] + (tail.shape[1] if tail is not None else 0))
    out, out_scale = _fp8_rows(rows, head.shape[-1], head)
    launch_modulated_norm(head, tail, shift, scale, eps, out, out_scale)
    return as_e4m3(out), out_scale


@triton_op("kontext::residual_modulated_norm_fp8", mutates_args=())
def residual_modulated_norm_fp8(
    x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, width = x.shape
    h = torch.empty(batch, seq, width, device=x.device, dtype=x.dtype)
    out, out_scale = _fp8_rows(batch * seq, width, x)
    launch_residual_modulated_norm(x, a, gate, shift, scale, eps, h, out, out_scale)
    return h, as_e4m3(out), out_scale


@triton_op("kontext::gelu_fp8", mutates_args=())
def gelu_fp8(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, out_scale = _fp8_rows(m.shape[0], m.shape[1], m)
    launch_gelu(m, out, out_scale)
    return as_e4m3(out), out_scale


@triton_op("kontext::concat_gelu_fp8", mutates_args=())
def concat_gelu_fp8(a: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, out_scale = _fp8_rows(m.shape[0], a.shape[-1] + m.shape[-1], a)
    launch_concat_gelu(a, m, out, out_scale)
    return as_e4m3(out), out_scale


@triton_op("kontext::rowwise_fp8", mutates_args=())
def rowwise_fp8(a: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, out_scale = _fp8_rows(a.shape[0] * a.shape[1], a.shape[-1], a)
    launch_rowwise(a, split, out, out_scale)
    return as_e4m3(out), out_scale
