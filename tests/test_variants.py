"""Variant cache: built once per config, shares unchanged weights, reports memory, evicts LRU."""

from __future__ import annotations

import re

import torch

from engine.engine import KontextEngine
from engine.requests import EditRequest
from engine.variants import clone_sharing_tensors, storage_bytes
from stages.config import OptimizationConfig


def test_clone_shares_every_tensor(tiny_engine):
    transformer = tiny_engine.loaded.pipe.transformer
    clone = clone_sharing_tensors(transformer)
    assert clone is not transformer
    assert clone.transformer_blocks[0] is not transformer.transformer_blocks[0]
    assert all(a is b for a, b in zip(clone.parameters(), transformer.parameters()))
    assert storage_bytes(clone) == storage_bytes(transformer)


def test_variant_built_once_and_reused():
    engine = KontextEngine.load("tiny", "cpu", max_variants=2)
    request = EditRequest(prompt="x", seed=1, steps=2)
    fused = OptimizationConfig(fuse_qkv=True)
    first = engine.edit(request, fused)
    second = engine.edit(request, fused)
    assert first.variant["first_use"] and first.timings.variant_build_s > 0
    assert not second.variant["first_use"] and second.timings.variant_build_s == 0
    executions = [row for row in engine.variants.report() if row["kind"] == "execution"]
    assert len(executions) == 1 and executions[0]["uses"] == 2
    engine.edit(request, fused)
    assert [row["uses"] for row in engine.variants.report() if row["kind"] == "execution"] == [3]  # counted live, every use


def test_fused_variant_reports_exactly_the_fused_weights():
    engine = KontextEngine.load("tiny", "cpu")
    engine.edit(EditRequest(prompt="x", seed=1, steps=1), OptimizationConfig(fuse_qkv=True))
    [weights] = [row for row in engine.variants.report() if row["kind"] == "weights"]
    # The fused projections are concatenations of the unfused ones: the same number of bytes.
    unfused = sum(
        p.numel() * p.element_size()
        for name, p in engine.loaded.pipe.transformer.named_parameters()
        if re.search(r"\.(to_[qkv]|add_[qkv]_proj)\.", name)
    )
    assert unfused > 0 and weights["added_memory_mb"] == round(unfused / 2**20, 1)


def test_execution_only_variants_add_no_weight_memory(tiny_engine):
    tiny_engine.edit(EditRequest(prompt="x", seed=1, steps=1), OptimizationConfig(compile=True, fuse_qkv=False))
    compiled = [row for row in tiny_engine.variants.report() if row["kind"] == "execution" and row["key"].get("compile")]
    assert compiled and compiled[0]["added_memory_mb"] == 0.0


def test_least_recently_used_variant_is_evicted():
    engine = KontextEngine.load("tiny", "cpu", max_variants=1)
    request = EditRequest(prompt="x", seed=1, steps=1)
    engine.edit(request, OptimizationConfig(fuse_qkv=True))
    engine.edit(request, OptimizationConfig())
    report = engine.variants.report()
    executions = [row for row in report if row["kind"] == "execution"]
    assert len(executions) == 1 and executions[0]["key"] == {}  # the fused variant went; the plain one stays
    # the fused weights went with the only variant that used them
    assert [row for row in report if row["kind"] == "weights" and row["key"]] == []


def test_base_weights_untouched_by_variants(tiny_engine):
    before = {name: p.clone() for name, p in tiny_engine.loaded.pipe.transformer.named_parameters()}
    tiny_engine.edit(EditRequest(prompt="x", seed=1, steps=1), OptimizationConfig(fuse_qkv=True, channels_last=True))
    after = dict(tiny_engine.loaded.pipe.transformer.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert tiny_engine.loaded.pipe.transformer.transformer_blocks[0].attn.to_q is not None
    conv = tiny_engine.loaded.pipe.vae.encoder.conv_in.weight
    assert conv.is_contiguous()  # the base VAE stays NCHW


def test_a_deferred_move_never_holds_the_idle_serving_thread_behind_a_build(tiny_engine):
    """settle_some runs on the serving thread when it is idle; while a build beside it holds the
    variant cache's lock, it gives its turn back instead of waiting for the whole build."""
    import threading

    variants = KontextEngine(tiny_engine.loaded, tiny_engine.env, max_variants=2).variants
    variants.residency_pending = True  # as a GPU build that deferred its move leaves it
    held, release, released = threading.Event(), threading.Event(), threading.Event()

    def build():
        with variants._build_lock:
            held.set()
            release.wait(60)
        released.set()

    builder = threading.Thread(target=build)
    builder.start()
    assert held.wait(60)
    try:
        assert variants.settle_some() is True and not released.is_set()  # came back while the build held the lock
        assert variants.residency_pending
    finally:
        release.set()
        builder.join(60)
    assert variants.settle_some() is False and not variants.residency_pending  # nothing on a GPU to move here
