"""LoRA under regional compile (tiny model, CPU Inductor): once the variants with and without LoRA
slots have compiled, switching among loaded adapters, changing scales and going back to no adapter
compile nothing, as Dynamo's own counters and its error_on_recompile switch show; in merge mode,
where adapters change the weights themselves, neither."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from engine.benchmark.runner import benchmark_input_image
from engine.requests import EditRequest, LoraChoice
from stages.config import MAX_PRESET, cumulative_config

pytestmark = pytest.mark.slow

# The default GPU stack as a CPU runs it (compile, fused QKV, sigmoid GELU, NHWC VAE), and the
# request benchmarks/lora_bench.py makes on the CPU: its test then finds these graphs in Inductor's cache.
COMPILED = cumulative_config(MAX_PRESET).with_changes(first_block_cache=False)
REQUEST = EditRequest(prompt="make the sky red", image=benchmark_input_image(64, 64), seed=5, steps=2, width=64, height=64)


def edit(engine, *loras, config=COMPILED) -> np.ndarray:
    request = dataclasses.replace(REQUEST, loras=tuple(LoraChoice(*choice) for choice in loras))
    return np.asarray(engine.edit(request, config).images[0])


def test_switching_adapters_and_scales_under_compile_never_recompiles(lora_engine):
    edit(lora_engine)  # compiles the variant without LoRA layers
    edit(lora_engine, ("style",))  # compiles the LoRA variant
    graphs = counters["stats"]["unique_graphs"]
    switches = [
        (("style", 0.5),),
        (("kohya",),),
        (("style", 0.7), ("kohya", 1.3)),
        (("kohya", 0.2), ("style", 1.1)),
        (("style", -0.4),),
        (("style", 0.0),),  # runs the variant without LoRA layers
        (),
        (("kohya", 1.3), ("style", 0.7)),
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises instead of passing unnoticed
        outputs = {loras: edit(lora_engine, *loras) for loras in switches}
    assert counters["stats"]["unique_graphs"] == graphs
    # and the compiled results are the adapters' (eager reference, same fused variant; 8-bit pictures)
    eager = COMPILED.with_changes(compile=False)
    for loras in [(("style", 0.7), ("kohya", 1.3)), (("style", -0.4),)]:
        assert np.abs(outputs[loras].astype(int) - edit(lora_engine, *loras, config=eager).astype(int)).max() <= 1
    assert np.array_equal(outputs[(("style", 0.7), ("kohya", 1.3))], outputs[(("kohya", 1.3), ("style", 0.7))])
    assert np.array_equal(outputs[(("style", 0.0),)], outputs[()])


def test_merging_adapters_under_compile_never_recompiles(tiny_engine, lora_dir):
    from tests.test_lora_merge import merge_engine_for

    engine = merge_engine_for(tiny_engine, lora_dir)
    edit(engine)  # compiles the one variant both modes of request run on
    graphs = counters["stats"]["unique_graphs"]
    switches = [(("style", 0.5),), (("kohya",),), (("style", 0.7), ("kohya", 1.3)), (), (("style", -0.4),)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = {loras: edit(engine, *loras) for loras in switches}
    assert counters["stats"]["unique_graphs"] == graphs
    eager = COMPILED.with_changes(compile=False)
    for loras in [(("style", 0.7), ("kohya", 1.3)), (("style", -0.4),)]:  # the compiled code read the merged weights
        assert np.abs(outputs[loras].astype(int) - edit(engine, *loras, config=eager).astype(int)).max() <= 1
    assert np.abs(outputs[()].astype(int) - edit(engine, config=eager).astype(int)).max() <= 1


def test_building_the_lora_variant_changes_nothing_the_other_variants_guard_on(tiny_engine):
    """peft freezes every parameter it does not own; the base tensors are shared with the other
    variants, whose compiled code guards on requires_grad (found as a recompile of the variant
    without LoRA layers after the LoRA variant was built: to_qkv's bias had flipped)."""
    from engine.variants import clone_sharing_tensors
    from stages.lora_slots import LoraSlotBank

    transformer = clone_sharing_tensors(tiny_engine.loaded.pipe.transformer)
    transformer.fuse_qkv_projections()  # new Parameters, created with requires_grad=True
    flags = {name: parameter.requires_grad for name, parameter in transformer.named_parameters()}
    assert any(flags.values())
    variant = clone_sharing_tensors(transformer)
    LoraSlotBank(variant, slots=2, rank=4)
    assert {name: parameter.requires_grad for name, parameter in transformer.named_parameters()} == flags
