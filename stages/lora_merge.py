"""LoRA merge: a request's adapters added into the transformer's own weights (re-quantized where
they are FP8), so that a step with adapters costs what a step without them costs; the price is paid
when the adapter set changes (a restore and a merge) instead of at every step, as with the slots
(stages/lora_slots.py). The engine picks one of the two for the whole server (serve --lora-mode).

How a merge stays correct and cheap:
* W' = W + sum_i scale_i * B_i @ A_i, in float32 on the weight's device. A bf16 weight is rounded
  once; an FP8 row-wise weight (torchao's Float8Tensor) is dequantized, summed and re-quantized with
  its own settings, one scale per row, always from the base values, so errors never accumulate over
  swaps.
* Before its first merge, each weight is copied to host memory (pinned on a GPU) and the copy is kept
  while the weight lives: a restore copies it back, so the base returns bit for bit, and the next
  merge needs no second copy.
* Only tensor data changes, in place: compiled code guards on the same tensors and CUDA graphs replay
  the same addresses, so a swap neither recompiles nor re-records.
* Variants share weight tensors (engine/variants.py), so a merge is seen by every variant sharing
  them. One merged set is kept at a time; the variant cache restores the base values before it
  builds, evicts or moves anything, and a request with other adapters or another variant restores
  before it merges its own (stages/lora.py).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .lora_weights import ScaledLora, lora_places, part_rows, wait_for_copies
from .tensors import is_quantized, leaf_tensors


class UnmergeableWeight(ValueError):
    """A weight format the merge cannot re-quantize (the slots work with every format)."""


class MergeRefused(ValueError):
    """A request's adapters cannot be merged into this variant (the weights were left as they were)."""


def _row_wise_fp8(weight: torch.Tensor) -> bool:
    block = list(getattr(weight, "block_size", ()))
    return type(weight).__name__ == "Float8Tensor" and block == [1, weight.shape[-1]]


def check_mergeable(weight: torch.Tensor, name: str) -> None:
    if is_quantized(weight) and not _row_wise_fp8(weight):
        raise UnmergeableWeight(
            f"{name}: a {type(weight).__name__} weight cannot be re-quantized by the LoRA merge "
            "(bf16 and row-wise FP8 can); run this config with serve --lora-mode slots"
        )


def high_precision(weight: torch.Tensor) -> torch.Tensor:
    """The weight's values in float32 (a new tensor)."""
    if is_quantized(weight):
        return weight.qdata.float() * weight.scale.float()
    return weight.detach().to(torch.float32, copy=True)  # never an alias of a float32 weight


def store(weight: torch.Tensor, values: torch.Tensor) -> None:
    """Write float32 `values` into `weight`'s own storage, in its own format."""
    if not is_quantized(weight):
        weight.data.copy_(values)
        return
    from torchao.quantization import Float8Tensor, PerRow

    quantized = Float8Tensor.from_hp(
        values,
        float8_dtype=weight.qdata.dtype,
        granularity=PerRow(),
        mm_config=weight.mm_config,
        kernel_preference=weight.kernel_preference,
        act_quant_kwargs=weight.act_quant_kwargs,
    )
    weight.qdata.copy_(quantized.qdata)
    weight.scale.copy_(quantized.scale.to(weight.scale.dtype))


def _same_adapters(left: Sequence[ScaledLora], right: Sequence[ScaledLora]) -> bool:
    return len(left) == len(right) and all(a is b and x == y for (a, x), (b, y) in zip(left, right))


class MergedLoras:
    """The adapters merged into the weights now, the variant they were merged through, and the host
    copies that undo them. `lock` is held while merged weights are in use (an edit) or while they must
    not be (a variant build reads base weights): merges, restores and builds take turns."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.variant_key: tuple | None = None
        self.adapters: tuple[ScaledLora, ...] = ()
        self._changed: list[torch.Tensor] = []  # weights that hold a merge now
        self._backups = WeakIdKeyDictionary()  # weight -> host copies of its leaf tensors

    def holds(self, variant_key: tuple, adapters: Sequence[ScaledLora]) -> bool:
        """True when exactly these adapters (same objects, same scales) are merged for this variant."""
        return not self._changed and not adapters or (self.variant_key == variant_key and _same_adapters(self.adapters, adapters))

    @property
    def merged_any(self) -> bool:
        """Adapters are in the weights now (a request without them must restore first)."""
        return bool(self._changed)

    @property
    def backup_bytes(self) -> int:
        return sum(copy.nbytes for copies in self._backups.values() for copy in copies)

    @torch.no_grad()
    def restore(self) -> float:
        """Every merged weight back to its base values, bit for bit; the seconds it took (0: nothing merged)."""
        if not self._changed:
            self.variant_key, self.adapters = None, ()
            return 0.0
        started = time.perf_counter()
        for weight in self._changed:
            for leaf, copy in zip(leaf_tensors(weight), self._backups[weight]):
                leaf.copy_(copy, non_blocking=True)
        wait_for_copies(self._changed[0].device)
        self._changed, self.variant_key, self.adapters = [], None, ()
        return time.perf_counter() - started

    @torch.no_grad()
    def merge(self, transformer: torch.nn.Module, variant_key: tuple, adapters: Sequence[ScaledLora]) -> float:
        """Add `adapters` into the weights of `transformer`, which must hold base weights (restore
        first); the seconds it took. Checks every target before changing anything, and restores what it
        changed if it fails halfway, so a refused merge leaves the model as it was."""
        if self._changed:
            raise RuntimeError("merge over merged weights: restore first")
        started = time.perf_counter()
        places = lora_places(transformer)
        by_layer: dict[torch.nn.Module, list] = defaultdict(list)
        for weights, scale in adapters:
            for module, factors in weights.modules.items():
                if module not in places:
                    raise ValueError(f"adapter {weights.name!r}: this variant has no Linear {module!r}")
                layer, part = places[module]
                check_mergeable(layer.weight, module)
                by_layer[layer].append((part, factors, scale))
        try:
            for layer, terms in by_layer.items():
                weight = layer.weight
                self._back_up(weight)
                values = high_precision(weight)
                for part, factors, scale in terms:
                    rows = part_rows(values.shape[0], part)
                    values[rows].addmm_(factors.up.float(), factors.down.float(), alpha=scale)
                self._changed.append(weight)  # before the write: a failed write is restored too
                store(weight, values)
        except BaseException:
            self.restore()
            raise
        if self._changed:
            wait_for_copies(self._changed[0].device)
        self.variant_key, self.adapters = variant_key, tuple(adapters)
        return time.perf_counter() - started

    def _back_up(self, weight: torch.Tensor) -> None:
        if weight in self._backups:
            return
        pinned = weight.device.type == "cuda"
        copies = []
        for leaf in leaf_tensors(weight):
            copy = torch.empty(leaf.shape, dtype=leaf.dtype, device="cpu", pin_memory=pinned)
            copies.append(copy.copy_(leaf))
        self._backups[weight] = copies
