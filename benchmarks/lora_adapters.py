"""LoRA adapters made in code with peft, saved in the diffusers or the kohya (sd-scripts) layout: for
the tests, the LoRA benchmark, and trying the service without downloading an adapter.

    python -m benchmarks.lora_adapters --model tiny --rank 4 --out ~/.cache/flux-kontext-optimized/loras/demo.safetensors

Random adapters change outputs by a visible amount and mean nothing else; a real adapter is a
.safetensors file trained for FLUX.1 (dev or Kontext), copied into the LoRA directory.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

# The attention and MLP Linears of a FLUX block (what FLUX LoRAs usually train), by diffusers name.
DOUBLE_BLOCK_LINEARS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
SINGLE_BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")

# kohya sd-scripts' FLUX module names -> the diffusers modules each one holds (qkv is fused there).
# single_blocks_N_linear1 (q, k, v and the MLP in one) is left out: diffusers' converter splits it
# with FLUX.1's widths, which the tiny model does not have.
KOHYA_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
}
KOHYA_SINGLE = {"linear2": ("proj_out",)}


def block_targets(transformer: torch.nn.Module) -> list[str]:
    """Every attention and MLP Linear of the double and single blocks."""
    names = [f"transformer_blocks.{i}.{leaf}" for i in range(len(transformer.transformer_blocks)) for leaf in DOUBLE_BLOCK_LINEARS]
    names += [
        f"single_transformer_blocks.{i}.{leaf}" for i in range(len(transformer.single_transformer_blocks)) for leaf in SINGLE_BLOCK_LINEARS
    ]
    return names


def kohya_targets(transformer: torch.nn.Module) -> list[str]:
    """The modules a kohya-layout adapter from `save_kohya` covers."""
    names = [f"transformer_blocks.{i}.{p}" for i in range(len(transformer.transformer_blocks)) for ps in KOHYA_DOUBLE.values() for p in ps]
    names += [
        f"single_transformer_blocks.{i}.{p}"
        for i in range(len(transformer.single_transformer_blocks))
        for ps in KOHYA_SINGLE.values()
        for p in ps
    ]
    return names


@torch.no_grad()
def random_adapter(
    transformer: torch.nn.Module, rank: int, seed: int = 0, targets: list[str] | None = None, alpha: float | None = None, gain: float = 0.5
):
    """A random LoRA built by peft on a clone that shares the model's weights (the model is untouched).

    Returns (peft state dict on the CPU, its LoraConfig). peft starts B at zero; here A ~ N(0, 1/in)
    and B ~ N(0, gain^2/rank), so each adapted layer's output moves by about `gain` times its input's
    scale: visible on random weights without overflowing bf16 through 57 blocks."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from engine.variants import clone_sharing_tensors

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=targets or block_targets(transformer),
        init_lora_weights=False,
    )
    scratch = clone_sharing_tensors(transformer)
    inject_adapter_in_model(config, scratch, adapter_name="made")
    device = next(transformer.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    for name, parameter in scratch.named_parameters():
        if ".lora_A." in name:
            std = parameter.shape[1] ** -0.5
        elif ".lora_B." in name:
            std = gain * parameter.shape[1] ** -0.5
        else:
            continue
        parameter.copy_(torch.randn(parameter.shape, generator=generator, device=device, dtype=torch.float32) * std)
    state = get_peft_model_state_dict(scratch, adapter_name="made")
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}, config


def save_diffusers(path: str | os.PathLike, state: dict, config) -> None:
    """diffusers' layout (transformer.<module>.lora_A/B.weight), with the LoraConfig in the metadata."""
    from diffusers import FluxKontextPipeline

    directory, name = os.path.split(os.fspath(path))
    metadata = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    FluxKontextPipeline.save_lora_weights(
        directory or ".", transformer_lora_layers=state, weight_name=name, transformer_lora_adapter_metadata=metadata
    )


def save_kohya(path: str | os.PathLike, state: dict, config, transformer: torch.nn.Module) -> None:
    """sd-scripts' FLUX layout, exactly equivalent: a fused qkv module gets lora_down = [A_q; A_k; A_v]
    and lora_up = blockdiag(B_q, B_k, B_v), and alpha = scaling * its rank."""
    import safetensors.torch

    scaling = config.lora_alpha / config.r
    tensors = {}

    def put(kohya_name: str, modules: list[str]) -> None:
        down = torch.cat([state[f"{m}.lora_A.weight"] for m in modules], 0)
        up = torch.block_diag(*[state[f"{m}.lora_B.weight"] for m in modules])
        tensors[f"{kohya_name}.lora_down.weight"] = down.contiguous()
        tensors[f"{kohya_name}.lora_up.weight"] = up.contiguous()
        tensors[f"{kohya_name}.alpha"] = torch.tensor(scaling * down.shape[0])

    for i in range(len(transformer.transformer_blocks)):
        for key, parts in KOHYA_DOUBLE.items():
            put(f"lora_unet_double_blocks_{i}_{key}", [f"transformer_blocks.{i}.{p}" for p in parts])
    for i in range(len(transformer.single_transformer_blocks)):
        for key, parts in KOHYA_SINGLE.items():
            put(f"lora_unet_single_blocks_{i}_{key}", [f"single_transformer_blocks.{i}.{p}" for p in parts])
    safetensors.torch.save_file(tensors, os.fspath(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="the model the adapter is for (tiny, synthetic-full, a repo id or directory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gain", type=float, default=0.5, help="how far each adapted layer moves its output")
    parser.add_argument("--layout", choices=("diffusers", "kohya"), default="diffusers")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write (its name is the adapter's name)")
    args = parser.parse_args(argv)

    from engine.loading import load_model

    transformer = load_model(args.model, args.device).pipe.transformer
    targets = kohya_targets(transformer) if args.layout == "kohya" else None
    state, config = random_adapter(transformer, args.rank, args.seed, targets, gain=args.gain)
    args.out.expanduser().parent.mkdir(parents=True, exist_ok=True)
    if args.layout == "kohya":
        save_kohya(args.out.expanduser(), state, config, transformer)
    else:
        save_diffusers(args.out.expanduser(), state, config)
    print(f"wrote {args.out} (rank {args.rank}, {len(state) // 2} layers, {args.layout} layout)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
