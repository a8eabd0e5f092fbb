"""Runtime LoRA adapters: slots in a LoRA execution variant, filled for one request at a time.

In slots mode (serve --lora-mode slots, the default; merge mode is stages/lora_merge.py), the engine
switches this stage on only for a request that names adapters (it sets `lora_slots` and `lora_rank`
from the server's LoRA settings), so such requests run on their own execution variant:
a structural clone of the same weight variant (no extra base memory) with slot layers on every
Linear (stages/lora_slots.py says why slots). Requests without adapters, or whose adapters all have
scale 0, run the variant without LoRA layers, so "no adapter" is the base output bit for bit and
costs nothing. Registered before the attention kernel, the cache and compile, so that those wrap
the slot layers; it needs no rule with them (the first-block cache keeps its state per request).
"""

from __future__ import annotations

import contextlib
import time

import torch

from .base import Phase, Stage
from .lora_slots import LoraSlotBank
from .lora_weights import wait_for_copies

BANK_ATTRIBUTE = "lora_slot_bank"  # where a LoRA variant's transformer keeps its slots


def slot_bank(transformer: torch.nn.Module) -> LoraSlotBank:
    bank = getattr(transformer, BANK_ATTRIBUTE, None)
    if bank is None:
        raise RuntimeError("this transformer variant has no LoRA slots (the lora stage did not build it)")
    return bank


class LoraSlots(Stage):
    name = "lora"
    benchmark_stage = None
    title = "LoRA adapters"
    summary = "Runtime LoRA adapters: fixed slots on every transformer Linear, filled in place per request (no merge, no recompile)."
    phases = frozenset({Phase.EXECUTION, Phase.REQUEST})

    def is_requested(self, config):
        return config.lora_slots > 0

    def switched_off(self, config):
        return config.with_changes(lora_slots=0, lora_rank=0)

    def active_detail(self, config, env):
        return f"{config.lora_slots} slot(s) of rank {config.lora_rank} on every transformer Linear"

    def apply_execution(self, transformer, config, build):
        bank = LoraSlotBank(transformer, config.lora_slots, config.lora_rank)
        setattr(transformer, BANK_ATTRIBUTE, bank)
        build.note(
            f"lora: {config.lora_slots} slot(s) of rank {config.lora_rank} on {len(bank.layers)} Linears, {bank.nbytes / 2**20:.1f} MB"
        )

    def apply_request(self, run, config):
        bank = slot_bank(run.transformer)
        stats = run.extras.setdefault("lora", {})
        stats.update(
            adapters=[{"name": weights.name, "scale": scale, "rank": weights.rank} for weights, scale in run.loras],
            slots=bank.slots,
            slot_rank=bank.rank,
        )
        run.contexts.append(_filled(bank, run.loras, stats))


@contextlib.contextmanager
def _filled(bank: LoraSlotBank, adapters, stats: dict):
    started = time.perf_counter()
    with bank.applied(adapters):
        wait_for_copies(bank.device)
        stats["swap_s"] = time.perf_counter() - started  # copying the adapters in: what a switch costs
        yield
