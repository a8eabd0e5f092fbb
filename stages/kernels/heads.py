"""Attention's inputs in one pass: per-head RMSNorm of Q and K, RoPE, and (for FP8 attention) e4m3.

The QKV GEMMs write rows of [q | k | v] (or three tensors when QKV is not fused): for a double block
one such tensor for the text tokens and one for the image tokens, for a single block one for all.
FlashAttention takes (batch, tokens, heads, head_dim) with the text tokens first. One program takes
a few token rows of one batch and, for each, normalises every head of q and k (RMSNorm over the
head's 128 values, FLUX's eps 1e-6, the text or image stream's own weights), rotates each pair of
values by the row's RoPE angle, and writes q and k in that layout. V is gathered into the same
layout (bf16 attention) or, for FP8 attention, reduced to a per-(batch, head) maximum here (FA3 takes
one V scale per batch and head, so every row must be seen before any can be cast) and cast by a
second, light kernel that reads V again.

Q and K in FP8 use a scale fixed by their norm bound (stages/attention_kernels.py: qk_norm_bound),
computed once per block, so they need no reduction and no per-call kernel. Bytes per token row
(C = heads * head_dim = 3072): bf16 attention reads 6C and writes 6C; FP8 attention reads 6C,
writes 2C, then reads V again (2C) and writes it (1C).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .rows_fp8 import _FP8_MAX, _MIN_AMAX, as_e4m3, e4m3_buffer

# Launch options of the q/k kernel. A program takes QK_HEADS heads (a power of two; None: all of
# them, FLUX's 24 heads as a 32-row tile with a quarter masked) of QK_ROWS token rows. Measured with
# `benchmarks/fused_kernels.py --sweep`, FP8 output without the V cast, 8704 rows: on an H100
# (2026-12-05) 8 heads x 2 rows x 2 warps took 89.8 us against 98.4 for all heads x 1 row (the
# fastest all-heads option: 94.5, 2 rows); on an H200 (2026-12-05) all heads x 1 row x 2 warps took
# 82 us against 96 with 4 warps (heads per program not swept there). Three programs of 8 heads leave
# no lane masked and give the GPU three times as many programs to hide each row's two reductions.
QK_ROWS, QK_WARPS, QK_HEADS = 2, 2, 8
# The light V cast keeps 4 rows and 8 warps.
V_ROWS, V_WARPS = 4, 8
# RoPE pairs each even value with the odd one after it: the kernel splits the (heads, D) tile into
# even and odd halves and joins them back. Loading the row a second time at index ^ 1 instead (an L1
# hit, no reshape) was measured on an H200 on 2026-12-05 at 276-472 us against 82-97 and removed.


@triton.jit
def _source(s, b, seq, split, head_ptr, head_stride, tail_ptr, tail_stride):
    """The row of token s of batch b: text tokens [0, split) in `head`, the rest in `tail`."""
    if s < split:
        ptr = head_ptr + (b * split + s) * head_stride
    else:
        ptr = tail_ptr + (b * (seq - split) + (s - split)) * tail_stride
    return ptr


@triton.jit
def _pairs(ptr, offs, mask, HB: tl.constexpr, D: tl.constexpr):
    """The even and odd members of each RoPE pair of a (heads, D) tile, in float32."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (HB, D // 2, 2)))


@triton.jit
def _norm_rope(ptr, offs, mask, w_even, w_odd, cos, sin, EPS: tl.constexpr, HB: tl.constexpr, D: tl.constexpr):
    even, odd = _pairs(ptr, offs, mask, HB, D)
    rstd = tl.rsqrt((tl.sum(even * even, axis=1) + tl.sum(odd * odd, axis=1)) / D + EPS)
    even = even * rstd[:, None] * w_even[None, :]
    odd = odd * rstd[:, None] * w_odd[None, :]
    return tl.reshape(tl.join(even * cos[None, :] - odd * sin[None, :], odd * cos[None, :] + even * sin[None, :]), (HB, D))


@triton.jit
def _weight_pairs(ptr, D: tl.constexpr):
    w = tl.load(ptr + tl.arange(0, D)).to(tl.float32)
    return tl.split(tl.reshape(w, (D // 2, 2)))


@triton.jit
def _qk_norm_rope_kernel(
    q_head, k_head, v_head, head_stride, q_tail, k_tail, v_tail, tail_stride, seq, split,
    wq_head, wk_head, wq_tail, wk_tail, cos_ptr, sin_ptr, q_scale_ptr, k_scale_ptr,
    q_out, k_out, v_out, v_amax_ptr, heads,
    EPS: tl.constexpr, ROWS: tl.constexpr, HB: tl.constexpr, D: tl.constexpr, FP8_OUT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * ROWS
    h = tl.program_id(2) * HB + tl.arange(0, HB)  # this program's heads
    offs = h[:, None] * D + tl.arange(0, D)[None, :]
    mask = (h < heads)[:, None]
    half = tl.arange(0, D // 2)
    wq_head_even, wq_head_odd = _weight_pairs(wq_head, D)
    wk_head_even, wk_head_odd = _weight_pairs(wk_head, D)
    wq_tail_even, wq_tail_odd = _weight_pairs(wq_tail, D)
    wk_tail_even, wk_tail_odd = _weight_pairs(wk_tail, D)
    if FP8_OUT:  # one descale for every head (the bound of the norms' weights)
        q_mul = 1.0 / tl.load(q_scale_ptr).to(tl.float32)
        k_mul = 1.0 / tl.load(k_scale_ptr).to(tl.float32)
    v_amax = tl.zeros([HB], dtype=tl.float32)
    for r in range(ROWS):
        s = first + r
        if s < seq:
            text = s < split
            cos = tl.load(cos_ptr + s * D + 2 * half)  # each angle is stored twice, once per pair member
            sin = tl.load(sin_ptr + s * D + 2 * half)
            out_row = (b * seq + s) * heads * D
            q = _norm_rope(
                _source(s, b, seq, split, q_head, head_stride, q_tail, tail_stride), offs, mask,
                tl.where(text, wq_head_even, wq_tail_even), tl.where(text, wq_head_odd, wq_tail_odd), cos, sin, EPS, HB, D,
            )  # fmt: skip
            k = _norm_rope(
                _source(s, b, seq, split, k_head, head_stride, k_tail, tail_stride), offs, mask,
                tl.where(text, wk_head_even, wk_tail_even), tl.where(text, wk_head_odd, wk_tail_odd), cos, sin, EPS, HB, D,
            )  # fmt: skip
            v = tl.load(_source(s, b, seq, split, v_head, head_stride, v_tail, tail_stride) + offs, mask=mask, other=0.0)
            if FP8_OUT:
                q = tl.clamp(q * q_mul, -_FP8_MAX, _FP8_MAX)
                k = tl.clamp(k * k_mul, -_FP8_MAX, _FP8_MAX)
                v_amax = tl.maximum(v_amax, tl.max(tl.abs(v.to(tl.float32)), axis=1))
            else:
                tl.store(v_out + out_row + offs, v.to(v_out.dtype.element_ty), mask=mask)
            tl.store(q_out + out_row + offs, q.to(q_out.dtype.element_ty), mask=mask)
            tl.store(k_out + out_row + offs, k.to(k_out.dtype.element_ty), mask=mask)
    if FP8_OUT:
        tl.atomic_max(v_amax_ptr + b * heads + h, v_amax, mask=h < heads)


@triton.jit
def _v_fp8_kernel(
    v_head, head_stride, v_tail, tail_stride, seq, split, v_amax_ptr, v_out, v_scale_ptr, heads,
    ROWS: tl.constexpr, HB: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * ROWS
    h = tl.arange(0, HB)
    offs = h[:, None] * D + tl.arange(0, D)[None, :]
    mask = (h < heads)[:, None]
    amax = tl.maximum(tl.load(v_amax_ptr + b * heads + h, mask=h < heads, other=1.0), _MIN_AMAX)
    if tl.program_id(1) == 0:  # FA3's V descale, written once per batch
        tl.store(v_scale_ptr + b * heads + h, amax / _FP8_MAX, mask=h < heads)
    multiplier = tl.expand_dims(_FP8_MAX / amax, 1)
    for r in range(ROWS):
        s = first + r
        if s < seq:
            v = tl.load(_source(s, b, seq, split, v_head, head_stride, v_tail, tail_stride) + offs, mask=mask, other=0.0)
            v = tl.clamp(v.to(tl.float32) * multiplier, -_FP8_MAX, _FP8_MAX)
            tl.store(v_out + (b * seq + s) * heads * D + offs, v.to(v_out.dtype.element_ty), mask=mask)


def launch_qk_norm_rope(
    head: tuple | None, tail: tuple, batch: int, heads: int, norms: tuple, cos, sin, eps, q_out, k_out, v_out,
    descales: tuple | None = None, v_amax=None, rows_per_program: int = QK_ROWS, num_warps: int = QK_WARPS,
    heads_per_program: int | None = QK_HEADS,
) -> None:  # fmt: skip
    """Normalise, rotate and gather the rows of `head` (text tokens first, or None) and `tail`.

    head, tail: (q, k, v) views of shape (batch * tokens, heads * head_dim) with one row stride
    norms: (q weight for head, k weight for head, q weight for tail, k weight for tail), each (head_dim,)
    q_out, k_out, v_out: (batch, tokens, heads, head_dim); descales (q, k: FA3's, one value for all
    heads) and v_amax (batch, heads, zeroed) given: FP8 output, with V only reduced here
    (launch_v_fp8 casts it)."""
    split = head[0].shape[0] // batch if head is not None else 0
    seq = split + tail[0].shape[0] // batch
    head = head if head is not None else tail
    dim = q_out.shape[-1]
    fp8 = descales is not None
    q_scale, k_scale = descales if fp8 else (cos, cos)  # unread without FP8
    v_amax = v_amax if fp8 else cos
    tile_heads = min(heads_per_program or heads, triton.next_power_of_2(heads))
    grid = (batch, triton.cdiv(seq, rows_per_program), triton.cdiv(heads, tile_heads))
    wrap_triton(_qk_norm_rope_kernel)[grid](
        *head, head[0].stride(0), *tail, tail[0].stride(0), seq, split, *norms, cos, sin, q_scale, k_scale,
        q_out, k_out, v_out, v_amax, heads,
        EPS=eps, ROWS=rows_per_program, HB=triton.next_power_of_2(tile_heads), D=dim, FP8_OUT=fp8, num_warps=num_warps,
    )  # fmt: skip


def launch_v_fp8(head_v, tail_v, batch: int, heads: int, v_amax, v_out, v_scale) -> None:
    """v_out = e4m3(v / (v_amax / 448)) per (batch, head), gathered as launch_qk_norm_rope does;
    v_scale (batch, heads) gets FA3's V descale, v_amax / 448."""
    split = head_v.shape[0] // batch if head_v is not None else 0
    seq = split + tail_v.shape[0] // batch
    head_v = head_v if head_v is not None else tail_v
    dim = v_out.shape[-1]
    wrap_triton(_v_fp8_kernel)[(batch, triton.cdiv(seq, V_ROWS))](
        head_v, head_v.stride(0), tail_v, tail_v.stride(0), seq, split, v_amax, v_out, v_scale, heads,
        ROWS=V_ROWS, HB=triton.next_power_of_2(heads), D=dim, num_warps=V_WARPS,
    )  # fmt: skip


def _layout(tail_q: torch.Tensor, head_q: torch.Tensor | None, batch: int, heads: int) -> tuple[int, int, int]:
    tokens = (tail_q.shape[0] + (head_q.shape[0] if head_q is not None else 0)) // batch
    return batch, tokens, tail_q.shape[-1] // heads


@triton_op("kontext::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q_head: torch.Tensor | None, k_head: torch.Tensor | None, v_head: torch.Tensor | None,
    q_tail: torch.Tensor, k_tail: torch.Tensor, v_tail: torch.Tensor,
    wq_head: torch.Tensor, wk_head: torch.Tensor, wq_tail: torch.Tensor, wk_tail: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, batch: int, heads: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """bf16 (batch, tokens, heads, head_dim) q, k, v for bf16 attention."""
    b, tokens, dim = _layout(q_tail, q_head, batch, heads)
    q, k, v = (torch.empty(b, tokens, heads, dim, device=q_tail.device, dtype=q_tail.dtype) for _ in range(3))
    head = (q_head, k_head, v_head) if q_head is not None else None
    launch_qk_norm_rope(head, (q_tail, k_tail, v_tail), batch, heads, (wq_head, wk_head, wq_tail, wk_tail), cos, sin, eps, q, k, v)
    return q, k, v


@triton_op("kontext::qk_norm_rope_fp8", mutates_args=())
def qk_norm_rope_fp8(
    q_head: torch.Tensor | None, k_head: torch.Tensor | None, v_head: torch.Tensor | None,
    q_tail: torch.Tensor, k_tail: torch.Tensor, v_tail: torch.Tensor,
    wq_head: torch.Tensor, wk_head: torch.Tensor, wq_tail: torch.Tensor, wk_tail: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor, batch: int, heads: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """e4m3 (batch, tokens, heads, head_dim) q, k, v and V's FA3 descale (batch, heads). Q and K are
    scaled by the descales given (their norm bound / 448, stages/attention_kernels.py), which FA3
    takes as they are."""
    b, tokens, dim = _layout(q_tail, q_head, batch, heads)
    q, k, v = (e4m3_buffer(b, tokens, heads, dim, like=q_tail) for _ in range(3))
    v_amax = torch.zeros(b, heads, device=q_tail.device, dtype=torch.float32)
    v_scale = torch.empty(b, heads, device=q_tail.device, dtype=torch.float32)
    head = (q_head, k_head, v_head) if q_head is not None else None
    norms = (wq_head, wk_head, wq_tail, wk_tail)
    launch_qk_norm_rope(head, (q_tail, k_tail, v_tail), batch, heads, norms, cos, sin, eps, q, k, v, (q_scale, k_scale), v_amax)
    launch_v_fp8(v_head, v_tail, batch, heads, v_amax, v, v_scale)
    return as_e4m3(q), as_e4m3(k), as_e4m3(v), v_scale
