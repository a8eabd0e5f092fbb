"""Runtime LoRA adapters, in one of two modes that the engine picks for the whole server
(serve --lora-mode), so that a request alone decides which adapters run and nothing carries over:

    slots  (stages/lora_slots.py) the request runs on an execution variant of its own: a structural
           clone of the same weight variant (no extra base memory) with slot layers on every Linear,
           which its adapters are copied into (and zeroed after it). Any mix of requests follows each
           other cheaply; every step pays for the extra branch.
    merge  (stages/lora_merge.py) the adapters are added into the weights that every variant shares,
           so a step costs what it costs without them; a change of adapter set costs a restore from a
           host copy and a merge. This mode builds nothing of its own (its build key is empty).

The engine switches this stage on (`lora`, and for slots `lora_slots` and `lora_rank` from the
server's LoRA settings) only for a request that names adapters, or in merge mode for a request that
must first restore the weights an earlier request merged. Requests without adapters, or whose
adapters all have scale 0, run the variant without LoRA layers, so "no adapter" is the base output
bit for bit. Registered before the attention kernel, the cache and compile, so that those wrap the
slot layers; it needs no rule with them (the first-block cache keeps its state per request).
"""

from __future__ import annotations

import contextlib
import time

import torch

from .base import Stage
from .lora_merge import MergedLoras, MergeRefused
from .lora_slots import LoraSlotBank
from .lora_weights import wait_for_copies

BANK_ATTRIBUTE = "lora_slot_bank"  # where a LoRA variant's transformer keeps its slots


def slot_bank(transformer: torch.nn.Module) -> LoraSlotBank:
    bank = getattr(transformer, BANK_ATTRIBUTE, None)
    if bank is None:
        raise RuntimeError("this transformer variant has no LoRA slots (the lora stage did not build it)")
    return bank


class Lora(Stage):
    switch = "lora"
    title = "LoRA adapters"
    summary = "Runtime LoRA adapters: fixed slots on every transformer Linear filled per request, or merged into the weights."

    def switched_off(self, config):
        return config.with_changes(lora="off", lora_slots=0, lora_rank=0)

    def build_key(self, config):
        # merged adapters live in the weights every variant shares: merge mode needs no variant of its own
        return super().build_key(config) if config.lora != "merge" else ()

    def active_detail(self, config, env):
        if config.lora == "merge":
            return "merged into the weights (restored from a host copy when the adapter set changes)"
        return f"{config.lora_slots} slot(s) of rank {config.lora_rank} on every transformer Linear"

    def apply_execution(self, transformer, config, build):
        if config.lora != "slots":
            return  # merge mode changes weight values per request, never modules
        bank = LoraSlotBank(transformer, config.lora_slots, config.lora_rank)
        setattr(transformer, BANK_ATTRIBUTE, bank)
        build.note(
            f"lora: {config.lora_slots} slot(s) of rank {config.lora_rank} on {len(bank.layers)} Linears, {bank.nbytes / 2**20:.1f} MB"
        )

    def apply_request(self, run, config):
        stats = run.extras.setdefault("lora", {})
        stats["adapters"] = [{"name": weights.name, "scale": scale, "rank": weights.rank} for weights, scale in run.loras]
        if config.lora == "merge":
            stats["mode"] = "merge"
            run.contexts.append(_merged(run.merged, run.transformer, run.variant_key, run.loras, stats))
            return
        bank = slot_bank(run.transformer)
        stats.update(slots=bank.slots, slot_rank=bank.rank)
        run.contexts.append(_filled(bank, run.loras, stats))


@contextlib.contextmanager
def _filled(bank: LoraSlotBank, adapters, stats: dict):
    started = time.perf_counter()
    with bank.applied(adapters):
        wait_for_copies(bank.device)
        stats["swap_s"] = time.perf_counter() - started  # copying the adapters in: what a switch costs
        yield


@contextlib.contextmanager
def _merged(merged: MergedLoras, transformer: torch.nn.Module, key: tuple, adapters, stats: dict):
    """The request's adapters in the weights while it runs (merged unless they are already), under the
    lock that keeps variant builds from reading merged weights; a refused merge leaves the base weights."""
    with merged.lock:
        restore_s = merge_s = 0.0
        if not merged.holds(key, adapters):
            restore_s = merged.restore()
            if adapters:
                try:
                    merge_s = merged.merge(transformer, key, adapters)
                except ValueError as error:  # a Linear this variant lacks, or a weight format the merge cannot write
                    raise MergeRefused(str(error)) from None
        stats.update(
            swap_s=restore_s + merge_s,  # 0: these adapters were merged already
            restore_s=restore_s,
            merge_s=merge_s,
            host_backup_mb=round(merged.backup_bytes / 2**20, 1),
        )
        yield
