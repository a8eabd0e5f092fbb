"""The fused block forwards (stages/fused_blocks.py) against diffusers' own blocks with the same FP8
weights, on the CPU: the Triton kernels run in Triton's interpreter and the FP8 GEMMs in torch's
CPU `_scaled_mm`. Both block types, two batches, odd token counts, fused and separate QKV, bf16 and
FP8 attention inputs."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton", reason="needs triton (requirements-dev.txt)")

from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock  # noqa: E402

from stages import fused_blocks  # noqa: E402
from stages.low_precision import is_quantized_linear  # noqa: E402
from tests.fused_references import rope_tables  # noqa: E402

HEADS, HEAD_DIM = 2, 16
WIDTH = HEADS * HEAD_DIM
BATCH, TEXT, IMAGE = 2, 5, 13


def rowwise_fp8_weights(block: torch.nn.Module, prefix: str) -> None:
    """What stage 3 does to a block on an FP8 GPU (torchao's row-wise FP8 weights with dynamic
    activations), done by hand: torchao's config refuses a CPU, but its tensor and its GEMM run here."""
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor, QuantizeTensorToFloat8Kwargs

    for name, module in block.named_modules():
        if is_quantized_linear(module, prefix + name):
            weight = Float8Tensor.from_hp(
                module.weight.detach(),
                granularity=PerRow(),
                mm_config=Float8MMConfig(use_fast_accum=True),
                act_quant_kwargs=QuantizeTensorToFloat8Kwargs(torch.float8_e4m3fn, PerRow()),
            )
            module.weight = torch.nn.Parameter(weight, requires_grad=False)


def _random_blocks(kind: str, seed: int, fuse_qkv: bool, head_dim: int = HEAD_DIM) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(a bf16 block with row-wise FP8 weights, the same block in float32 without quantization)."""
    torch.manual_seed(seed)
    width = HEADS * head_dim
    if kind == "double":
        block, prefix = FluxTransformerBlock(width, HEADS, head_dim), "transformer_blocks.0."
    else:
        block, prefix = FluxSingleTransformerBlock(width, HEADS, head_dim), "single_transformer_blocks.0."
    with torch.no_grad():
        for parameter in block.parameters():  # FLUX-like magnitudes: unit activations stay near unit
            parameter.copy_(
                torch.randn_like(parameter) / parameter.shape[-1] ** 0.5 if parameter.dim() > 1 else 0.1 * torch.randn_like(parameter)
            )
        for norm in (
            block.attn.norm_q,
            block.attn.norm_k,
            getattr(block.attn, "norm_added_q", None),
            getattr(block.attn, "norm_added_k", None),
        ):
            if norm is not None:
                norm.weight.add_(1.0)
    block = block.to(torch.bfloat16).eval()
    exact = copy.deepcopy(block).float()
    if fuse_qkv:
        block.attn.fuse_projections()
    rowwise_fp8_weights(block, prefix)
    return block, exact


def _inputs(seed: int, head_dim: int = HEAD_DIM):
    gen = torch.Generator().manual_seed(seed)
    width = HEADS * head_dim
    hidden = torch.randn(BATCH, IMAGE, width, generator=gen).to(torch.bfloat16)
    text = torch.randn(BATCH, TEXT, width, generator=gen).to(torch.bfloat16)
    temb = torch.randn(BATCH, width, generator=gen).to(torch.bfloat16)
    return hidden, text, temb, rope_tables(TEXT + IMAGE, head_dim, gen)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("attention", ["sdpa", "fp8_emulated"])
@pytest.mark.parametrize("fuse_qkv", [True, False], ids=["fused-qkv", "separate-qkv"])
def test_fused_forward_computes_what_diffusers_computes(kind, attention, fuse_qkv):
    block, exact = _random_blocks(kind, seed=3, fuse_qkv=fuse_qkv)
    fused = copy.deepcopy(block)
    fused_blocks.install_fused_forward(fused, attention)
    hidden, text, temb, rotary = _inputs(seed=4)
    with torch.no_grad():
        want = block(hidden, text, temb, image_rotary_emb=rotary)  # diffusers' forward, the same FP8 weights
        got = fused(hidden, text, temb, image_rotary_emb=rotary)
        ideal = exact(hidden.float(), text.float(), temb.float(), image_rotary_emb=rotary)  # float32, unquantized
    for got_part, want_part, ideal_part in zip(got, want, ideal):  # (text, image)
        assert got_part.shape == want_part.shape and got_part.dtype == torch.bfloat16
        # What differs is rounding: diffusers rounds every intermediate to bf16 and quantizes with
        # torchao, the kernels compute in fp32. The fused output must be as close to the exact
        # function as diffusers' FP8 output is (FP8 attention adds its own quantization on top).
        assert _relative(got_part, want_part) < 0.03
        slack = 1.15 if attention == "sdpa" else 1.3
        assert _relative(got_part, ideal_part) < slack * _relative(want_part, ideal_part) + 2e-3
    # the fused forward is the block's own: the diffusers forward of the original is untouched
    with torch.no_grad():
        again = block(hidden, text, temb, image_rotary_emb=rotary)
    torch.testing.assert_close(again[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_the_mlp_epilogue_computes_what_diffusers_computes(kind):
    """The image stream's FF (double) and the MLP + proj_out (single) on the epilogue GEMMs
    (stages/kernels/gemm_epilogue.py): widths of whole 128-column blocks (hidden 128, MLP 512)."""
    block, exact = _random_blocks(kind, seed=3, fuse_qkv=True, head_dim=64)
    rows, epilogue = copy.deepcopy(block), copy.deepcopy(block)
    fused_blocks.install_fused_forward(rows, "sdpa")
    fused_blocks.install_fused_forward(epilogue, "sdpa")
    fused_blocks.install_mlp_epilogue(epilogue)
    hidden, text, temb, rotary = _inputs(seed=4, head_dim=64)
    with torch.no_grad():
        want = block(hidden, text, temb, image_rotary_emb=rotary)
        by_rows = rows(hidden, text, temb, image_rotary_emb=rotary)
        got = epilogue(hidden, text, temb, image_rotary_emb=rotary)
        ideal = exact(hidden.float(), text.float(), temb.float(), image_rotary_emb=rotary)
    changed = (1,) if kind == "double" else (0, 1)  # the double blocks' text stream keeps the row kernels
    for part, (got_part, want_part, ideal_part) in enumerate(zip(got, want, ideal)):
        assert got_part.shape == want_part.shape and got_part.dtype == torch.bfloat16
        assert _relative(got_part, want_part) < 0.03
        # 1x128 block scales follow the values at least as closely as one scale per row
        assert _relative(got_part, ideal_part) < 1.15 * _relative(want_part, ideal_part) + 2e-3
        if part in changed:  # the epilogue path ran: its rounding is not the row kernels'
            assert not torch.equal(got_part, by_rows[part])
        else:
            torch.testing.assert_close(got_part, by_rows[part], rtol=0, atol=0)


def test_the_mlp_epilogue_refuses_widths_that_are_not_whole_blocks():
    block, _ = _random_blocks("single", seed=5, fuse_qkv=True)  # hidden 32, MLP 128: proj_out takes 160
    fused_blocks.install_fused_forward(block, "sdpa")
    assert "multiples of 128" in fused_blocks.mlp_epilogue_unfit_reason(block)
    with pytest.raises(ValueError, match="cannot run the MLP epilogue"):
        fused_blocks.install_mlp_epilogue(block)
    unfused, _ = _random_blocks("double", seed=5, fuse_qkv=True, head_dim=64)
    with pytest.raises(ValueError, match="install_fused_forward first"):
        fused_blocks.install_mlp_epilogue(unfused)


def test_blocks_without_fp8_weights_are_refused():
    block = FluxSingleTransformerBlock(WIDTH, HEADS, HEAD_DIM).to(torch.bfloat16)
    assert "no row-wise FP8 weight" in fused_blocks.unfusable_reason(block)
    with pytest.raises(ValueError, match="cannot run fused"):
        fused_blocks.install_fused_forward(block, "sdpa")


def test_attention_kwargs_are_refused_not_ignored():
    block, _ = _random_blocks("single", seed=5, fuse_qkv=True)
    fused_blocks.install_fused_forward(block, "sdpa")
    hidden, text, temb, rotary = _inputs(seed=6)
    with pytest.raises(ValueError, match="joint_attention_kwargs"):
        block(hidden, text, temb, image_rotary_emb=rotary, joint_attention_kwargs={"scale": 0.5})


def test_the_stage_fuses_every_block_of_the_tiny_transformer(tiny_engine):
    """The stage on a whole (tiny) FluxTransformer2DModel: every block fused, and the transformer's
    output as close to diffusers' with the same FP8 weights as the blocks' are. Few tokens: the
    interpreter runs each program in Python."""
    from stages.base import BuildContext
    from stages.config import OptimizationConfig
    from stages.fused_kernels import FusedKernels

    transformer = tiny_engine.loaded.pipe.transformer  # float32 on the CPU: the FP8 path is bf16's
    base, fused = copy.deepcopy(transformer).to(torch.bfloat16), copy.deepcopy(transformer).to(torch.bfloat16)
    rowwise_fp8_weights(base, "")
    rowwise_fp8_weights(fused, "")
    build = BuildContext(tiny_engine.env, torch.device("cpu"), torch.bfloat16)
    FusedKernels().apply_execution(fused, OptimizationConfig(fused_kernels=True, quantization="fp8", attention="sdpa"), build)
    blocks = [*fused.transformer_blocks, *fused.single_transformer_blocks]
    assert all("fused_gemms" in block._modules for block in blocks), build.notes
    assert f"{len(blocks)} of {len(blocks)} blocks" in build.notes[0]

    gen = torch.Generator().manual_seed(8)
    config = transformer.config
    image_tokens, text_tokens = 24, 6
    inputs = dict(
        hidden_states=torch.randn(1, image_tokens, config.in_channels, generator=gen).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, generator=gen).to(torch.bfloat16),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=gen).to(torch.bfloat16),
        timestep=torch.tensor([0.7], dtype=torch.bfloat16),
        guidance=torch.tensor([3.5], dtype=torch.bfloat16),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1).reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    with torch.no_grad():
        want = base(**inputs)[0]
        got = fused(**inputs)[0]
    assert got.shape == want.shape == (1, image_tokens, config.in_channels)
    assert _relative(got, want) < 0.05


def test_every_attention_kernel_the_rules_let_through_has_a_fused_path():
    from stages.rules import FUSED_ATTENTION

    assert set(FUSED_ATTENTION) <= set(fused_blocks.SUPPORTED_ATTENTION)


def test_the_glue_bytes_model_counts_flux_at_1024():
    """The bytes the fused kernels move per step for a 1024x1024 edit: 55-65 GB, as counted by hand
    in issue 22 (13-16 ms at an H200's 4.0-4.3 TB/s)."""
    from types import SimpleNamespace

    from engine.benchmark.kernels import glue_bandwidth, glue_bytes

    flux = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38)
    moved = glue_bytes(flux, batch=1, text_tokens=512, image_tokens=8192, fp8_attention=True)
    assert 55e9 < sum(moved.values()) < 65e9
    assert sum(glue_bytes(flux, 1, 512, 8192, fp8_attention=False).values()) > sum(moved.values())  # bf16 q, k, v out
    # the MLP epilogue: the image streams' and single blocks' GELU and gated residual bytes leave the
    # glue (to the GEMMs), the single blocks' attention output (3C per row) is quantized on its own
    epilogue = glue_bytes(flux, 1, 512, 8192, fp8_attention=True, mlp_epilogue=True)
    gelu = 19 * 8192 * 3 * 12288 + 38 * 8704 * 3 * (3072 + 12288)
    residual_adds = (19 * 8192 + 38 * 8704) * 6 * 3072
    gone = gelu + residual_adds - 38 * 8704 * 3 * 3072
    assert sum(moved.values()) - sum(epilogue.values()) == gone
    kernel_ms = {label: 1.0 for label in moved} | {"gemm": 70.0, "attention": 60.0, "gaps": 5.0}
    rates = glue_bandwidth(kernel_ms, moved, fused=True)
    assert rates["all glue"] == round(sum(moved.values()) / (len(moved) * 1e-3) / 1e9, 1)  # gemm, attention, gaps left out
    assert set(rates) == set(moved) | {"all glue"}
    assert set(glue_bandwidth(kernel_ms, moved, fused=False)) == {"all glue"}
