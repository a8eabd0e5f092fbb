"""LoRA slots: fixed adapter capacity in a transformer variant, filled in place for one request.

Every Linear of the variant gets one peft LoRA adapter of rank `slots * rank` whose scaling is the
constant 1.0 (alpha == r). Slot i owns rank columns [i*rank, (i+1)*rank): a request copies each of
its adapters into a slot (A as is, B with alpha/r and the request's scale folded in) and the rest
stay zero; afterwards every slot is zeroed again. Why this shape:

* Nothing Dynamo guards on ever changes: the modules, the parameter objects, their shapes and
  dtypes, `requires_grad`, peft's active adapter and its float scaling. Only parameter storage
  changes, in place, so switching adapters or scales never recompiles (diffusers' `set_adapters`
  recompiles for every new combination) and CUDA graphs replay the same addresses.
* Nothing is merged into the base weights: the variant shares them with the other variants, so
  requests with different adapters can follow each other at no cost beyond the copies (the merge
  mode, stages/lora_merge.py, trades that for zero cost per step). On FP8 peft wraps the torchao
  Linear as its TorchaoLoraLinear, whose forward is the FP8 GEMM plus the bf16 LoRA path.
* One concatenated adapter costs two skinny GEMMs per Linear, whatever the number of slots.

A fused projection (QKV fusion drops to_q/to_k/to_v) holds the three unfused LoRAs exactly: its slot
has rank 3*rank, with A stacked ([A_q; A_k; A_v]) and B block-diagonal, so q's LoRA only reaches
q's output rows (stages/lora_weights.py places them).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch
from torch import nn

from .lora_weights import FUSED_PARTS, ScaledLora, linear_names, lora_places, part_rows

SLOT_ADAPTER = "slots"  # the peft adapter name on every slot layer


class LoraSlotBank:
    """The slot layers of one transformer variant, and the request-scoped filling of them."""

    def __init__(self, transformer: nn.Module, slots: int, rank: int):
        from peft import LoraConfig, inject_adapter_in_model

        if slots < 1 or rank < 1:
            raise ValueError(f"LoRA slots need at least one slot of rank 1, not {slots} of rank {rank}")
        self.slots, self.rank = slots, rank
        targets = linear_names(transformer)
        fused = {f"^{re.escape(name)}$": 3 * slots * rank for name in targets if name.rpartition(".")[2] in FUSED_PARTS}
        config = LoraConfig(
            r=slots * rank,
            lora_alpha=slots * rank,  # scaling 1.0: alpha/r and the request's scale live in B
            rank_pattern=fused,
            alpha_pattern=dict(fused),
            target_modules=targets,
            lora_dropout=0.0,
            init_lora_weights=True,  # B = 0; A is zeroed below as well, for exact zeros whatever x holds
        )
        # peft marks everything but its adapters as frozen; the base tensors are shared with the other
        # variants, and their compiled code guards on requires_grad: a flipped flag recompiles them.
        requires_grad = {parameter: parameter.requires_grad for parameter in transformer.parameters()}
        inject_adapter_in_model(config, transformer, adapter_name=SLOT_ADAPTER)
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
        self.layers = {name: transformer.get_submodule(name) for name in targets}
        self._places = lora_places(transformer, targets)
        for down, up in self._factors(self.layers.values()):
            for parameter in (down, up):
                parameter.requires_grad_(False)  # inference only, and one requires_grad guard value forever
                parameter.data.zero_()
        self._dirty: set[nn.Module] = set()

    @staticmethod
    def _factors(layers) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for layer in layers:
            yield layer.lora_A[SLOT_ADAPTER].weight, layer.lora_B[SLOT_ADAPTER].weight

    @property
    def device(self) -> torch.device:
        return next(self._factors(self.layers.values()))[0].device

    @property
    def nbytes(self) -> int:
        return sum(down.nbytes + up.nbytes for down, up in self._factors(self.layers.values()))

    def holds(self, module: str) -> bool:
        return module in self._places

    @torch.no_grad()
    def fill(self, adapters: Sequence[ScaledLora]) -> None:
        """Write each adapter into its slot (the request's scale folded into B); the rest stay zero."""
        if len(adapters) > self.slots:
            raise ValueError(f"{len(adapters)} adapters for {self.slots} LoRA slots")
        self.clear()
        for slot, (weights, scale) in enumerate(adapters):
            for module, factors in weights.modules.items():
                if module not in self._places:
                    raise ValueError(f"adapter {weights.name!r}: this variant has no Linear {module!r}")
                rank = factors.down.shape[0]
                if rank > self.rank:
                    raise ValueError(f"adapter {weights.name!r}: rank {rank} of {module} is over the slot rank {self.rank}")
                layer, part = self._places[module]
                down, up = next(self._factors([layer]))
                self._dirty.add(layer)
                # one of q, k, v in a fused projection has its own rank block and its own output rows
                column, rows = (slot if part is None else 3 * slot + part) * self.rank, part_rows(up.shape[0], part)
                down[column : column + rank].copy_(factors.down)
                block = up[rows, column : column + rank].copy_(factors.up)
                if scale != 1.0:
                    block.mul_(scale)

    @torch.no_grad()
    def clear(self) -> None:
        if self._dirty:
            torch._foreach_zero_([tensor for pair in self._factors(self._dirty) for tensor in pair])
            self._dirty.clear()

    @property
    def empty(self) -> bool:
        return not self._dirty

    @contextlib.contextmanager
    def applied(self, adapters: Sequence[ScaledLora]):
        """The adapters for the duration of one pipeline call; zeroed afterwards whatever happened."""
        try:
            self.fill(adapters)
            yield
        finally:
            self.clear()
