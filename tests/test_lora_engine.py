"""LoRA adapters through the engine (tiny model, fp32, CPU): scale 0 and unload give the base output
bit for bit, adapters combine as diffusers combines them (fused QKV too), and a request's adapters
never reach another request, whatever order requests come in or however one ends."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from engine.engine import EditCancelled, KontextEngine
from engine.loading import LoadedModel
from engine.lora_files import LoraError
from engine.requests import EditRequest, LoraChoice
from engine.variants import clone_sharing_tensors
from stages.config import OptimizationConfig
from stages.lora import slot_bank
from stages.lora_slots import LoraSlotBank
from stages.qkv_fusion import drop_unfused_projections
from tests.conftest import LORA_TEST_RANK

# diffusers' reference pipelines hold two adapters, which peft warns about
two_adapters_in_diffusers = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
REQUEST = EditRequest(prompt="make the sky red", seed=5, steps=2, width=64, height=64)


def edit(engine, *loras: tuple, config=None, **changes) -> np.ndarray:
    request = dataclasses.replace(REQUEST, loras=tuple(LoraChoice(*choice) for choice in loras), **changes)
    return np.asarray(engine.edit(request, config).images[0])


def test_scale_zero_and_no_adapter_run_the_base_bit_for_bit(lora_engine):
    base = lora_engine.edit(REQUEST)
    zero = lora_engine.edit(dataclasses.replace(REQUEST, loras=(LoraChoice("style", 0.0), LoraChoice("kohya", 0.0))))
    assert np.array_equal(np.asarray(zero.images[0]), np.asarray(base.images[0]))
    assert "lora" not in zero.extras and zero.config.lora_slots == 0  # the variant without LoRA layers ran
    assert not np.array_equal(edit(lora_engine, ("style", 1.0)), np.asarray(base.images[0]))  # the adapter does something


def test_unload_restores_the_base_exactly_and_leaves_other_adapters_working(lora_engine):
    base, kohya = edit(lora_engine), edit(lora_engine, ("kohya",))
    parameters = {name: tensor.clone() for name, tensor in lora_engine.loaded.pipe.transformer.state_dict().items()}
    lora_engine.loras.load("detail")
    with_detail = edit(lora_engine, ("detail",))
    assert not np.array_equal(with_detail, base)
    lora_engine.loras.unload("detail")
    assert np.array_equal(edit(lora_engine), base)
    assert np.array_equal(edit(lora_engine, ("kohya",)), kohya)
    after = lora_engine.loaded.pipe.transformer.state_dict()
    assert all(torch.equal(parameters[name], after[name]) for name in parameters)  # base weights never written
    assert np.array_equal(edit(lora_engine, ("detail",)), with_detail)  # named again: loaded on first use, the same output
    lora_engine.loras.unload("detail")


def _transformer_inputs(dtype=torch.float32) -> dict:
    """What FluxKontextPipeline hands the transformer: noisy and conditioning latents, text, ids."""
    generator = torch.Generator().manual_seed(0)
    tokens = 2 * 16
    return dict(
        hidden_states=torch.randn(1, tokens, 64, generator=generator, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=generator, dtype=dtype),
        pooled_projections=torch.randn(1, 32, generator=generator, dtype=dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        guidance=torch.tensor([2.5], dtype=dtype),
        img_ids=torch.randn(tokens, 3, generator=generator, dtype=dtype),
        txt_ids=torch.zeros(8, 3, dtype=dtype),
        return_dict=False,
    )


@torch.no_grad()
@two_adapters_in_diffusers
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused QKV"])
def test_two_adapters_combine_as_diffusers_computes_them(lora_engine, lora_dir, fused):
    pipe = lora_engine.loaded.pipe
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(lora_dir / "style.safetensors"), adapter_name="style")
    reference.load_lora_weights(str(lora_dir / "kohya.safetensors"), adapter_name="kohya")
    reference.set_adapters(["style", "kohya"], [0.7, 1.3])
    inputs = _transformer_inputs()
    expected = reference.transformer(**inputs)[0]

    variant = clone_sharing_tensors(pipe.transformer)  # as the variant cache builds one
    if fused:
        variant.fuse_qkv_projections()
        drop_unfused_projections(variant)
    bank = LoraSlotBank(variant, slots=2, rank=LORA_TEST_RANK)
    picked = lora_engine.loras.pick([LoraChoice("style", 0.7), LoraChoice("kohya", 1.3)])
    with bank.applied(picked):
        ours = variant(**inputs)[0]
    base = pipe.transformer(**inputs)[0]
    assert (expected - base).abs().max() > 0.1  # the adapters matter at this scale
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)  # measured 6e-7 on this CPU
    assert bank.empty and torch.equal(variant(**inputs)[0], base)  # emptied slots: the base again


@two_adapters_in_diffusers
def test_a_whole_edit_with_adapters_matches_diffusers(lora_engine, lora_dir):
    """The engine's LoRA path end to end against diffusers' own LoRA loading, same pipeline call."""
    reference = copy.deepcopy(lora_engine.loaded.pipe)
    reference.load_lora_weights(str(lora_dir / "style.safetensors"), adapter_name="style")
    reference.load_lora_weights(str(lora_dir / "kohya.safetensors"), adapter_name="kohya")
    reference.set_adapters(["style", "kohya"], [0.5, 1.2])
    loaded = lora_engine.loaded
    diffusers_engine = KontextEngine(LoadedModel(reference, loaded.spec, loaded.device, loaded.dtype), lora_engine.env)
    expected = edit(diffusers_engine).astype(int)
    for config in (None, OptimizationConfig(fuse_qkv=True)):
        ours = edit(lora_engine, ("style", 0.5), ("kohya", 1.2), config=config).astype(int)
        assert np.abs(ours - expected).max() <= 1  # 8-bit pictures of outputs that differ by ~1e-6


def test_adapters_never_leak_into_later_requests(lora_engine):
    """Back to back, in an order that switches every way: each result equals the first result of the same request."""
    sequence = [(), (("style",),), (), (("kohya", 0.8),), (("style", 0.7), ("kohya", 1.3)), (("style",),), (), (("kohya", 0.8),)]
    sequence += [(("kohya", 1.3), ("style", 0.7)), (("style", 0.5),), ()]
    first: dict = {}
    for loras in sequence:
        key = tuple(sorted(loras))  # order in the request does not matter
        image = edit(lora_engine, *loras)
        if key in first:
            assert np.array_equal(image, first[key]), loras
        first.setdefault(key, image)
    assert len({array.tobytes() for array in first.values()}) == len(first)  # and different requests differ


def test_a_request_that_stops_midway_leaves_the_slots_empty(lora_engine):
    base, style = edit(lora_engine), edit(lora_engine, ("style",))
    with pytest.raises(EditCancelled):
        lora_engine.edit(dataclasses.replace(REQUEST, loras=(LoraChoice("kohya"),)), should_stop=lambda: True)
    with_slots = lora_engine.with_lora(OptimizationConfig(), lora_engine.loras.pick([LoraChoice("style")]))
    lora_variant = lora_engine.variants.pipeline_for(lora_engine.resolve(with_slots).effective)
    assert slot_bank(lora_variant[0].transformer).empty
    assert np.array_equal(edit(lora_engine), base) and np.array_equal(edit(lora_engine, ("style",)), style)


@pytest.mark.parametrize("backend", ["para_attn", "diffusers"])
def test_the_first_block_cache_never_reuses_residuals_across_requests(lora_engine, backend):
    """With a threshold no change can reach, every call after a request's first skips the other blocks:
    each request still computes its own first call (it has no residual of its own yet) instead of
    taking the previous request's, computed under other adapters."""
    config = OptimizationConfig(first_block_cache=True, cache_backend=backend, cache_threshold=10.0)
    outputs = {}
    for loras in [(("style",),), (("kohya",),), (("kohya",),), (), (("style",),)]:
        request = dataclasses.replace(REQUEST, steps=4, loras=tuple(LoraChoice(*c) for c in loras))
        result = lora_engine.edit(request, config)
        assert result.extras["first_block_cache"]["computed"] == 1 and result.extras["first_block_cache"]["skipped"] == 3
        image = np.asarray(result.images[0])
        assert np.array_equal(outputs.setdefault(loras, image), image), loras  # after another adapter or after itself


def test_a_default_scale_comes_from_the_load(lora_engine):
    lora_engine.loras.load("detail", default_scale=0.5)
    try:
        assert np.array_equal(edit(lora_engine, ("detail",)), edit(lora_engine, ("detail", 0.5)))
    finally:
        lora_engine.loras.unload("detail")


@pytest.mark.parametrize(
    "loras, field, phrase",
    [
        ((("style",), ("kohya",), ("style", 0.5)), "loras", "at most 2"),
        ((("style",), ("style", 0.5)), "loras[1].name", "named twice"),
        ((("nowhere",),), "loras[0].name", "no adapter 'nowhere'"),
        ((("style", float("nan")),), "loras[0].scale", "not a finite number"),
    ],
)
def test_a_bad_adapter_list_is_refused_before_any_work(lora_engine, loras, field, phrase):
    uses = {row["kind"] + str(row["key"]): row["uses"] for row in lora_engine.variants.report()}
    with pytest.raises(LoraError, match=phrase) as refused:
        edit(lora_engine, *loras)
    assert refused.value.field == field
    assert {row["kind"] + str(row["key"]): row["uses"] for row in lora_engine.variants.report()} == uses
