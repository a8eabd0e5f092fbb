"""LoRA merge mode (tiny model, CPU): merged adapters give the slots' output, a change of adapters
restores the base bit for bit before merging the next set, a repeated set is not merged again, FP8
weights are re-quantized from their base values, and a refused merge leaves every weight as it was.

The merge engine runs on its own copy of the tiny model: merging writes into weights, and the other
tests' engines share theirs."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.lora_files import LoraError
from engine.lora_settings import LoraSettings
from engine.requests import EditRequest, LoraChoice
from stages.config import OptimizationConfig
from stages.lora_merge import MergedLoras, high_precision
from stages.lora_weights import LoraFactors, LoraWeights
from tests.conftest import LORA_TEST_RANK

REQUEST = EditRequest(prompt="make the sky red", seed=5, steps=2, width=64, height=64)


def merge_engine_for(tiny_engine, lora_dir, default_config=None) -> KontextEngine:
    loaded = tiny_engine.loaded
    private = LoadedModel(copy.deepcopy(loaded.pipe), loaded.spec, loaded.device, loaded.dtype)
    settings = LoraSettings(directory=str(lora_dir), mode="merge", max_rank=LORA_TEST_RANK, preload=("style", "kohya"))
    return KontextEngine(private, tiny_engine.env, default_config, max_variants=8, lora=settings)


@pytest.fixture(scope="module")
def merge_engine(tiny_engine, lora_dir) -> KontextEngine:
    return merge_engine_for(tiny_engine, lora_dir)


def run(engine, *loras: tuple, config=None):
    return engine.edit(dataclasses.replace(REQUEST, loras=tuple(LoraChoice(*choice) for choice in loras)), config)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(int)


def weights_of(engine) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in engine.loaded.pipe.transformer.state_dict().items()}


@pytest.mark.parametrize("config", [None, OptimizationConfig(fuse_qkv=True)], ids=["unfused", "fused QKV"])
def test_merged_adapters_give_what_the_slots_give(merge_engine, lora_engine, config):
    merged = run(merge_engine, ("style", 0.7), ("kohya", 1.3), config=config)
    slots = run(lora_engine, ("style", 0.7), ("kohya", 1.3), config=config)
    base = run(merge_engine, config=config)
    assert np.abs(pixels(merged) - pixels(slots)).max() <= 1  # 8-bit pictures of fp32 outputs that differ by rounding
    assert np.abs(pixels(merged) - pixels(base)).max() > 10  # and the adapters do change the picture
    info = merged.extras["lora"]
    assert info["mode"] == "merge" and info["merge_s"] > 0 and merged.config.lora_slots == 0  # no slot variant
    assert [adapter["name"] for adapter in info["adapters"]] == ["style", "kohya"]


def test_each_change_of_adapters_restores_the_base_exactly_and_nothing_leaks(merge_engine):
    base_weights = weights_of(merge_engine)
    sequence = [(), (("style",),), (), (("kohya", 0.8),), (("style", 0.7), ("kohya", 1.3)), (("style",),), (), (("kohya", 0.8),)]
    sequence += [(("style", 0.5),), (("style", 0.0),), ()]
    first: dict = {}
    for loras in sequence:
        key = tuple(choice for choice in loras if choice[-1] != 0.0)  # scale 0 changes nothing
        image = pixels(run(merge_engine, *loras))
        if key in first:
            assert np.array_equal(image, first[key]), loras  # bit for bit: every merge starts from the base
        first.setdefault(key, image)
    assert len({array.tobytes() for array in first.values()}) == len(first)
    after = merge_engine.loaded.pipe.transformer.state_dict()
    assert all(torch.equal(base_weights[name], after[name]) for name in base_weights)  # the last request had none


def test_the_same_adapters_again_cost_nothing_and_count_no_swap(merge_engine):
    run(merge_engine)
    first = run(merge_engine, ("style", 0.9))
    swaps = merge_engine.loras.report()["swaps"]["count"]
    again = run(merge_engine, ("style", 0.9))
    assert first.extras["lora"]["swap_s"] > 0 and again.extras["lora"]["swap_s"] == 0.0
    assert merge_engine.loras.report()["swaps"]["count"] == swaps and merge_engine.loras.report()["mode"] == "merge"
    assert np.array_equal(pixels(first), pixels(again))
    assert run(merge_engine, ("style", 0.8)).extras["lora"]["restore_s"] > 0  # another scale is another merge


def test_fp8_weights_are_requantized_from_their_base_values(tiny_engine, lora_dir, merge_engine):
    """FP8 weights (weight_only runs on a CPU; the re-quantization is the row-wise format's too):
    merged output near the full-precision merge, and the base FP8 values back bit for bit."""
    fp8 = merge_engine_for(tiny_engine, lora_dir, OptimizationConfig(transformer_fp8="weight_only"))
    base_weights = {name: [leaf.clone() for leaf in _leaves(t)] for name, t in fp8.loaded.pipe.transformer.state_dict().items()}
    base = pixels(run(fp8))
    merged = pixels(run(fp8, ("style", 0.7), ("kohya", 1.3)))
    full_precision = pixels(run(merge_engine, ("style", 0.7), ("kohya", 1.3)))
    assert np.abs(merged - full_precision).mean() < np.abs(base - full_precision).mean() / 3  # the adapters are in
    assert np.array_equal(pixels(run(fp8)), base)
    after = fp8.loaded.pipe.transformer.state_dict()
    assert all(all(torch.equal(a, b) for a, b in zip(base_weights[name], _leaves(after[name]))) for name in base_weights)


def _leaves(tensor):
    from stages.tensors import leaf_tensors

    return list(leaf_tensors(tensor))


def test_an_adapter_the_variant_cannot_hold_is_refused_and_changes_nothing(merge_engine):
    run(merge_engine)
    base_weights = weights_of(merge_engine)
    style = pixels(run(merge_engine, ("style",)))  # merged: the refused request comes after a merge
    split = OptimizationConfig(split_proj_out=True)  # single blocks without a proj_out Linear
    with pytest.raises(LoraError, match="cannot be merged here.*no Linear") as refused:
        run(merge_engine, ("style",), config=split)
    assert refused.value.field == "loras"
    after = merge_engine.loaded.pipe.transformer.state_dict()
    assert all(torch.equal(base_weights[name], after[name]) for name in base_weights)  # restored, nothing merged
    assert np.array_equal(pixels(run(merge_engine, ("style",))), style)  # and it serves on


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 6), nn.Linear(8, 6)


def _adapter(*modules: str) -> LoraWeights:
    generator = torch.Generator().manual_seed(3)
    factors = LoraFactors(torch.randn(2, 8, generator=generator), torch.randn(6, 2, generator=generator))
    return LoraWeights("toy", {module: factors for module in modules})


def test_a_merge_that_fails_halfway_puts_back_what_it_changed(monkeypatch):
    from stages import lora_merge

    model = _TwoLinears()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    writes = []

    def store_then_fail(weight, values):
        writes.append(weight)
        if len(writes) == 2:
            raise RuntimeError("out of memory while writing the second weight")
        weight.data.copy_(values)

    monkeypatch.setattr(lora_merge, "store", store_then_fail)
    merged = MergedLoras()
    with pytest.raises(RuntimeError, match="second weight"):
        merged.merge(model, ("key",), [(_adapter("first", "second"), 1.0)])
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert merged.holds(("other",), ())  # nothing counts as merged


def test_a_merge_adds_scale_times_b_a_to_each_weight():
    model = _TwoLinears()
    adapter = _adapter("second")
    base = high_precision(model.second.weight)
    merged = MergedLoras()
    merged.merge(model, ("key",), [(adapter, 0.5)])
    factors = adapter.modules["second"]
    torch.testing.assert_close(model.second.weight, base + 0.5 * factors.up @ factors.down)
    assert merged.holds(("key",), [(adapter, 0.5)]) and not merged.holds(("key",), [(adapter, 0.6)])
    with pytest.raises(RuntimeError, match="restore first"):
        merged.merge(model, ("key",), [(adapter, 0.6)])
    assert merged.restore() > 0 and torch.equal(model.second.weight, base)
