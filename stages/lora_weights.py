"""LoRA adapters as the model receives them, and where each adapted Linear lives in a variant.

Adapters are always described with the unfused diffusers module names (`...attn.to_q`). A variant
with fused QKV has no `to_q`: its `to_qkv` holds q, k and v as three row blocks, and `lora_places`
maps each unfused name to the Linear and the row block that carry it. The slots (stages/lora_slots.py)
and the merge (stages/lora_merge.py) both place adapters through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FUSED_PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


@dataclass(frozen=True)
class LoraFactors:
    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B: [out_features, rank], alpha/rank already folded in


@dataclass(frozen=True)
class LoraWeights:
    """One adapter: factors by unfused diffusers module name."""

    name: str
    modules: dict[str, LoraFactors]

    @property
    def rank(self) -> int:
        return max(factors.down.shape[0] for factors in self.modules.values())


# An adapter and the scale one request runs it at.
ScaledLora = tuple[LoraWeights, float]


def linear_names(transformer: nn.Module) -> list[str]:
    return [name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)]


def lora_places(transformer: nn.Module, names: list[str] | None = None) -> dict[str, tuple[nn.Module, int | None]]:
    """Unfused module name -> (the Linear that computes it, its row block in a fused QKV or None)."""
    places: dict[str, tuple[nn.Module, int | None]] = {}
    for name in linear_names(transformer) if names is None else names:
        layer = transformer.get_submodule(name)
        prefix, _, leaf = name.rpartition(".")
        if leaf in FUSED_PARTS:
            for index, part in enumerate(FUSED_PARTS[leaf]):
                places[f"{prefix}.{part}"] = (layer, index)
        else:
            places[name] = (layer, None)
    return places


def part_rows(layer_out_features: int, part: int | None) -> slice:
    """The output rows of `part` (q, k or v) in a fused projection; all rows of an unfused one."""
    if part is None:
        return slice(None)
    height = layer_out_features // 3
    return slice(part * height, (part + 1) * height)


def wait_for_copies(device: torch.device) -> None:
    """On a GPU, copies into adapter slots or weights are asynchronous: wait for them, so that a
    measured swap time is the real one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
