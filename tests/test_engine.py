"""The edit call: determinism, sizes, timing breakdown, text-only generation, true CFG."""

from __future__ import annotations

import numpy as np

from engine.requests import EditRequest
from stages.config import OptimizationConfig


def test_same_seed_same_pixels_and_different_seed_different_pixels(tiny_engine, photo):
    request = EditRequest(prompt="make the sky red", image=photo, seed=11, steps=6)
    first, second = tiny_engine.edit(request), tiny_engine.edit(request)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    other = tiny_engine.edit(EditRequest(prompt="make the sky red", image=photo, seed=12, steps=6))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(other.images[0]))


def test_random_seed_is_reported_and_reproduces(tiny_engine, photo):
    result = tiny_engine.edit(EditRequest(prompt="add a hat", image=photo, steps=4))
    again = tiny_engine.edit(EditRequest(prompt="add a hat", image=photo, steps=4, seed=result.seed))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))


def test_timing_breakdown_covers_every_part(tiny_engine, photo):
    result = tiny_engine.edit(EditRequest(prompt="make the sky red", image=photo, seed=1, steps=5))
    t = result.timings
    assert len(t.step_s) == 5 and all(s > 0 for s in t.step_s)
    assert t.text_encode_s > 0 and t.vae_encode_s > 0 and t.vae_decode_s > 0
    assert t.denoise_s >= sum(t.step_s) * 0.99
    assert t.total_s > t.text_encode_s + t.vae_encode_s + t.denoise_s + t.vae_decode_s * 0.99
    assert result.steps == 5 and result.scheduler == "euler"


def test_default_is_euler_28_steps(tiny_engine, photo):
    result = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1))
    assert result.steps == 28 and len(result.timings.step_s) == 28


def test_output_follows_the_input_aspect_ratio_within_the_tiny_budget(tiny_engine, photo):
    result = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1, steps=2))
    width, height = result.images[0].size
    assert (width, height) == (result.width, result.height)
    assert width > height  # photo is 240x180 (landscape)
    assert width % 16 == 0 and height % 16 == 0 and width * height <= 256 * 256


def test_explicit_size_and_several_images(tiny_engine, photo):
    result = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1, steps=2, width=128, height=96, num_images=3))
    assert [im.size for im in result.images] == [(128, 96)] * 3
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


def test_text_only_generation(tiny_engine):
    result = tiny_engine.edit(EditRequest(prompt="A majestic mountain landscape at sunset", seed=3, steps=3))
    assert result.images[0].size == (256, 256)
    assert result.timings.vae_encode_s == 0.0  # nothing to encode


def test_true_cfg_runs_two_transformer_calls_per_step(tiny_engine, photo):
    calls = []
    hook = tiny_engine.loaded.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        plain = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1, steps=3))
        assert len(calls) == 3
        calls.clear()
        cfg = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1, steps=3, negative_prompt="blurry", true_cfg_scale=4.0))
        assert len(calls) == 6 and len(cfg.timings.step_s) == 3
    finally:
        hook.remove()
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(cfg.images[0]))


def test_unavailable_stages_are_skipped_with_reasons_not_errors(tiny_engine, photo):
    asked = OptimizationConfig(attention="fa3", quantization="mxfp4", cuda_graphs=True, fuse_qkv=True)
    result = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1, steps=2), asked)
    skipped = result.metadata()["skipped_stages"]
    assert set(skipped) >= {"attention", "quantization", "cuda_graphs"}
    assert all("CUDA" in reason for reason in skipped.values())
    assert result.active_stages == ["fuse_qkv"]
    assert result.config.attention == "sdpa" and result.config.quantization == "none"


def test_should_stop_ends_an_edit_at_a_step_boundary_and_the_engine_serves_on(tiny_engine, photo):
    import pytest

    from engine.engine import EditCancelled

    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(EditCancelled, match="after step 3 of 10"):
        tiny_engine.edit(
            EditRequest(prompt="x", image=photo, seed=1, steps=10), OptimizationConfig(first_block_cache=True), should_stop=stop_after_three
        )
    assert len(calls) == 3
    again = tiny_engine.edit(EditRequest(prompt="x", image=photo, seed=1, steps=4), OptimizationConfig(first_block_cache=True))
    assert again.extras["first_block_cache"]["transformer_calls"] == 4  # fresh cache state, nothing left over
