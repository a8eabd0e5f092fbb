"""FLUX's two block types with every elementwise stretch in a fused kernel (stages/kernels/).

diffusers 0.42.1's FluxTransformerBlock and FluxSingleTransformerBlock compute the same functions,
step by step in bf16; these forwards keep the blocks' modules and weights and change how the glue
between GEMMs and attention runs:

double block, for the image stream (the text stream alike, with its own modules):
    modulated_norm_fp8            LN(x) * (1 + scale_msa) + shift_msa        -> e4m3 rows  -> QKV GEMM
    qk_norm_rope(_fp8)            RMSNorm(q), RMSNorm(k), RoPE, text first  -> attention
    rowwise_fp8                   attention output, text rows first         -> to_add_out / to_out GEMMs
    residual_modulated_norm_fp8   h = x + gate_msa * attn; LN(h) * (1 + scale_mlp) + shift_mlp -> FF GEMM
    gelu_fp8                      GELU of the 12288-wide activation          -> FF output GEMM
    (Inductor)                    h + gate_mlp * ff
single block:
    modulated_norm_fp8            over the text and image halves (never concatenated) -> QKV and MLP GEMMs
    qk_norm_rope(_fp8)            as above                                   -> attention
    concat_gelu_fp8               [attention output, GELU(mlp)] as one e4m3 row -> proj_out GEMM
    (Inductor)                    [text, image] + gate * proj_out

With the MLP epilogue (`install_mlp_epilogue`, the mlp_epilogue stage) the image stream's FF and the
single blocks' MLP run on stages/kernels/gemm_epilogue.py instead: the FF input GEMM (the single
blocks' MLP GEMM) applies GELU and writes e4m3 in 1x128 blocks in its epilogue, so gelu_fp8 and
concat_gelu_fp8 and their bf16 round trip are gone (the single blocks' attention output is written
into the same row's first columns, in the same blocks), and the FF output GEMM (proj_out) takes the
block scales in its K loop and writes the block's new residual stream (x + gate * output) in its
epilogue, so Inductor's gated residual add and the bf16 output it read are gone too. The double
blocks' text stream (512 rows: 4 row tiles of 128, too few for a persistent GEMM to fill the GPU)
keeps the path above.

Every block Linear must hold torchao's row-wise FP8 weight (stage 3's quantization, or FP8 weights
from load): its e4m3 rows and scales go to torch._scaled_mm directly (stages/kernels/fp8_gemm.py).
Fused or separate Q/K/V projections both work. tests/test_fused_blocks.py compares these forwards
with diffusers' blocks on every run, so a diffusers change that breaks the equivalence fails loudly.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from . import attention_kernels
from .attention_kernels import FP8_E4M3_MAX, qk_norm_bound
from .kernels import heads as _heads  # noqa: F401  (registers torch.ops.kontext.qk_norm_rope*)
from .kernels import rows_fp8 as _rows  # noqa: F401  (registers torch.ops.kontext row ops)
from .kernels.fp8_gemm import Fp8Gemm, is_rowwise_fp8
from .kernels.gemm_epilogue import BLOCK_COLUMNS  # (registers torch.ops.kontext.fp8_gemm_*)

KNOWN_DIFFUSERS = ("0.42.1",)

# The attention kernel behind the fused inputs: FP8 ones take e4m3 q/k/v and their (batch, heads)
# descales, bf16 ones (batch, tokens, heads, head_dim) bf16. sdpa_on_fp8 is the CPU reference.
FP8_ATTENTION = {"fa3_fp8": attention_kernels.fa3_on_fp8, "fp8_emulated": attention_kernels.sdpa_on_fp8}
BF16_ATTENTION = {"fa3": attention_kernels.fa3_bf16, "sdpa": attention_kernels.sdpa}
SUPPORTED_ATTENTION = tuple(FP8_ATTENTION) + tuple(BF16_ATTENTION)


def _gemm_names(block: nn.Module) -> dict[str, nn.Module]:
    """The block's Linears that the fused forward calls, by the name it uses for each."""
    attn = block.attn
    names: dict[str, nn.Module] = {}
    for prefix, fused, parts in (
        ("", "to_qkv", ("to_q", "to_k", "to_v")),
        ("added_", "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
    ):
        if getattr(attn, fused, None) is not None:
            names[prefix + "qkv"] = getattr(attn, fused)
        elif getattr(attn, parts[0], None) is not None:
            names.update({prefix + part: getattr(attn, name) for part, name in zip("qkv", parts)})
    if hasattr(block, "ff"):  # double block
        names.update(
            out=attn.to_out[0],
            added_out=attn.to_add_out,
            ff_in=block.ff.net[0].proj,
            ff_out=block.ff.net[2],
            context_ff_in=block.ff_context.net[0].proj,
            context_ff_out=block.ff_context.net[2],
        )
    else:
        names.update(mlp=block.proj_mlp, proj_out=block.proj_out)
    return names


def unfusable_reason(block: nn.Module) -> str | None:
    """Why this block cannot run the fused forward, or None."""
    if getattr(block, "proj_out", 1) is None:
        return "its proj_out is split in two (split_proj_out)"
    for name, linear in _gemm_names(block).items():
        if not is_rowwise_fp8(linear):
            return f"its {name} Linear has no row-wise FP8 weight ({type(linear).__name__})"
    return None


def install_fused_forward(block: nn.Module, attention: str) -> None:
    """Give `block` its FP8 GEMMs, its Q/K norm bounds and the fused forward (in place)."""
    if attention not in SUPPORTED_ATTENTION:
        raise ValueError(f"the fused blocks run attention {', '.join(SUPPORTED_ATTENTION)}, not {attention!r}")
    reason = unfusable_reason(block)
    if reason:
        raise ValueError(f"{type(block).__name__} cannot run fused: {reason}")
    block.fused_gemms = nn.ModuleDict({name: Fp8Gemm(linear) for name, linear in _gemm_names(block).items()})
    attn = block.attn
    double = hasattr(block, "ff")
    q_norms = (attn.norm_q, attn.norm_added_q) if double else (attn.norm_q,)
    k_norms = (attn.norm_k, attn.norm_added_k) if double else (attn.norm_k,)
    # FP8 attention's Q and K descales: constant per block (the norms' weights bound them), so computed
    # once here, one value for every head, in the (batch, heads) shape FA3 takes
    for name, norms in (("fused_q_scale", q_norms), ("fused_k_scale", k_norms)):
        descale = qk_norm_bound(*norms, head_dim=attn.head_dim).float() / FP8_E4M3_MAX
        block.register_buffer(name, descale.reshape(1, 1).expand(1, attn.heads).contiguous().to(attn.norm_q.weight.device), False)
    block.fused_attention = attention
    block.fused_mlp_epilogue = False  # install_mlp_epilogue turns it on
    block.forward = types.MethodType(_fused_double_forward if double else _fused_single_forward, block)


def mlp_epilogue_unfit_reason(block: nn.Module) -> str | None:
    """Why this fused block's MLP cannot run on the epilogue GEMMs, or None."""
    gemms = block.fused_gemms
    names = ("ff_in", "ff_out") if "ff_in" in gemms else ("mlp", "proj_out")
    for name in names:
        n, k = gemms[name].qdata.shape
        if n % BLOCK_COLUMNS or k % BLOCK_COLUMNS:
            return f"its {name} GEMM is {k} -> {n}; the epilogue's 1x128 blocks need multiples of {BLOCK_COLUMNS}"
    return None


def install_mlp_epilogue(block: nn.Module) -> None:
    """Run this fused block's MLP on the epilogue GEMMs (in place; after install_fused_forward)."""
    if not hasattr(block, "fused_gemms"):
        raise ValueError(f"{type(block).__name__} has no fused forward: install_fused_forward first")
    reason = mlp_epilogue_unfit_reason(block)
    if reason:
        raise ValueError(f"{type(block).__name__} cannot run the MLP epilogue: {reason}")
    block.fused_mlp_epilogue = True


def _qkv(gemms: nn.ModuleDict, prefix: str, x8: torch.Tensor, x_scale: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    if prefix + "qkv" in gemms:
        qkv = gemms[prefix + "qkv"](x8, x_scale)
        return qkv[:, :width], qkv[:, width : 2 * width], qkv[:, 2 * width :]
    return tuple(gemms[prefix + part](x8, x_scale) for part in "qkv")


def _attention(block: nn.Module, text_qkv, image_qkv, batch: int, image_rotary_emb) -> torch.Tensor:
    """Normalise, rotate, attend: (batch, tokens, heads * head_dim) bf16, text tokens first."""
    attn = block.attn
    cos, sin = (table.contiguous() for table in image_rotary_emb)
    head = text_qkv if text_qkv is not None else (None, None, None)
    if text_qkv is not None:
        norms = (attn.norm_added_q.weight, attn.norm_added_k.weight, attn.norm_q.weight, attn.norm_k.weight)
    else:
        norms = (attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.weight, attn.norm_k.weight)
    eps = attn.norm_q.eps
    if block.fused_attention in FP8_ATTENTION:
        q_scale, k_scale = block.fused_q_scale, block.fused_k_scale
        if batch > 1:
            q_scale, k_scale = (scale.expand(batch, -1).contiguous() for scale in (q_scale, k_scale))
        q8, k8, v8, v_scale = torch.ops.kontext.qk_norm_rope_fp8(
            *head, *image_qkv, *norms, cos, sin, q_scale, k_scale, batch, attn.heads, eps
        )
        out = FP8_ATTENTION[block.fused_attention](q8, k8, v8, q_scale, k_scale, v_scale)
    else:
        inputs = torch.ops.kontext.qk_norm_rope(*head, *image_qkv, *norms, cos, sin, batch, attn.heads, eps)
        out = BF16_ATTENTION[block.fused_attention](*inputs)
    return out.reshape(batch, out.shape[1], -1).to(torch.bfloat16)


def _refuse_attention_kwargs(joint_attention_kwargs) -> None:
    if joint_attention_kwargs:
        raise ValueError(
            f"the fused blocks take no joint_attention_kwargs (got {sorted(joint_attention_kwargs)}); switch fused_kernels off"
        )


def _fused_double_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
    _refuse_attention_kwargs(joint_attention_kwargs)
    ops, gemms = torch.ops.kontext, self.fused_gemms
    batch, image_len, width = hidden_states.shape
    text_len = encoder_hidden_states.shape[1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(self.norm1.silu(temb)).chunk(6, dim=1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.linear(
        self.norm1_context.silu(temb)
    ).chunk(6, dim=1)

    x8, x_scale = ops.modulated_norm_fp8(hidden_states, None, shift_msa, scale_msa, self.norm1.norm.eps)
    c8, c_scale = ops.modulated_norm_fp8(encoder_hidden_states, None, c_shift_msa, c_scale_msa, self.norm1_context.norm.eps)
    attention = _attention(self, _qkv(gemms, "added_", c8, c_scale, width), _qkv(gemms, "", x8, x_scale, width), batch, image_rotary_emb)

    o8, o_scale = ops.rowwise_fp8(attention, text_len)  # text rows of every batch first
    text_rows = batch * text_len
    # cuBLASLt wants 16-byte aligned operands; the image rows' scales start after the text rows' ones
    image_scale = o_scale[text_rows:] if text_rows % 4 == 0 else o_scale[text_rows:].clone()
    image_attention = gemms["out"](o8[text_rows:], image_scale).view(batch, image_len, width)
    text_attention = gemms["added_out"](o8[:text_rows], o_scale[:text_rows]).view(batch, text_len, width)

    h, h8, h_scale = ops.residual_modulated_norm_fp8(hidden_states, image_attention, gate_msa, shift_mlp, scale_mlp, self.norm2.eps)
    if self.fused_mlp_epilogue:  # h + gate_mlp * ff written by ff_out's epilogue
        f8, f_scales = ops.fp8_gemm_gelu_blocks(h8, h_scale, *gemms["ff_in"].operands(), None)
        hidden_states = ops.fp8_gemm_a_blocks_gated_residual(f8, f_scales, *gemms["ff_out"].operands(), h, None, gate_mlp)
    else:
        f8, f_scale = ops.gelu_fp8(gemms["ff_in"](h8, h_scale))
        hidden_states = h + gate_mlp[:, None] * gemms["ff_out"](f8, f_scale).view(batch, image_len, width)

    c, c8, c_scale = ops.residual_modulated_norm_fp8(
        encoder_hidden_states, text_attention, c_gate_msa, c_shift_mlp, c_scale_mlp, self.norm2_context.eps
    )
    f8, f_scale = ops.gelu_fp8(gemms["context_ff_in"](c8, c_scale))
    encoder_hidden_states = c + c_gate_mlp[:, None] * gemms["context_ff_out"](f8, f_scale).view(batch, text_len, width)
    return encoder_hidden_states, hidden_states


def _fused_single_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
    _refuse_attention_kwargs(joint_attention_kwargs)
    ops, gemms = torch.ops.kontext, self.fused_gemms
    batch, image_len, width = hidden_states.shape
    text_len = encoder_hidden_states.shape[1]
    shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)

    # the rows of [text; image], read from the two halves: the concatenation is never written
    x8, x_scale = ops.modulated_norm_fp8(encoder_hidden_states, hidden_states, shift, scale, self.norm.norm.eps)
    if self.fused_mlp_epilogue:
        attention = _attention(self, None, _qkv(gemms, "", x8, x_scale, width), batch, image_rotary_emb)
        # [attention, GELU(mlp)] in 1x128 blocks: the MLP GEMM's epilogue writes its part of the row;
        # proj_out's epilogue writes [text; image] + gate * proj_out, read from the two halves
        y8, y_scales = ops.fp8_gemm_gelu_blocks(x8, x_scale, *gemms["mlp"].operands(), attention.reshape(-1, width))
        operands = gemms["proj_out"].operands()
        hidden_states = ops.fp8_gemm_a_blocks_gated_residual(y8, y_scales, *operands, encoder_hidden_states, hidden_states, gate)
    else:
        mlp = gemms["mlp"](x8, x_scale)
        attention = _attention(self, None, _qkv(gemms, "", x8, x_scale, width), batch, image_rotary_emb)
        y8, y_scale = ops.concat_gelu_fp8(attention, mlp)
        projected = gemms["proj_out"](y8, y_scale).view(batch, text_len + image_len, width)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1) + gate[:, None] * projected
    return hidden_states[:, :text_len], hidden_states[:, text_len:]
