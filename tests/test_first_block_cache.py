"""First-block cache: the skip rule, per-request state, both backends, the para-attn patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.requests import EditRequest
from stages.config import OptimizationConfig
from tests.conftest import image_distance

BACKENDS = ["para_attn", "diffusers"]


def cached(backend: str, threshold: float) -> OptimizationConfig:
    return OptimizationConfig(first_block_cache=True, cache_backend=backend, cache_threshold=threshold)


def _request(photo, **kwargs) -> EditRequest:
    return EditRequest(prompt="make the sky red", image=photo, seed=21, steps=kwargs.pop("steps", 8), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_zero_skips_nothing_and_matches_uncached(tiny_engine, photo, backend):
    plain = tiny_engine.edit(_request(photo))
    result = tiny_engine.edit(_request(photo), cached(backend, 0.0))
    stats = result.extras["first_block_cache"]
    assert (stats["computed"], stats["skipped"], stats["backend"]) == (8, 0, backend)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_threshold_computes_only_what_the_rule_requires(tiny_engine, photo, backend):
    # The first call has no previous residual to compare with, so it must compute; every later call skips.
    result = tiny_engine.edit(_request(photo), cached(backend, 10.0))
    assert result.extras["first_block_cache"]["computed"] == 1 and result.extras["first_block_cache"]["skipped"] == 7
    # With true CFG the conditional and unconditional branches keep separate residuals: one computed call each.
    cfg = tiny_engine.edit(_request(photo, negative_prompt="blurry", true_cfg_scale=3.0), cached(backend, 10.0))
    assert cfg.extras["first_block_cache"]["transformer_calls"] == 16 and cfg.extras["first_block_cache"]["computed"] == 2


def _first_block_residual_changes(engine, photo) -> list[float]:
    """Hand-computed: relative mean |change| of the first block's image-stream residual, step to step."""
    transformer = engine.loaded.pipe.transformer
    residuals = []

    def record(module, args, kwargs, output):
        residuals.append((output[1] - kwargs["hidden_states"]).double())

    handle = transformer.transformer_blocks[0].register_forward_hook(record, with_kwargs=True)
    try:
        engine.edit(_request(photo, steps=2))  # the same schedule as the decisions below
    finally:
        handle.remove()
    return [((now - before).abs().mean() / before.abs().mean()).item() for before, now in zip(residuals, residuals[1:])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hand_computed_residual_change_decides_the_skip(tiny_engine, photo, backend):
    change = _first_block_residual_changes(tiny_engine, photo)[0]  # step 1 against step 0
    just_above, just_below = change * 1.001, change * 0.999
    skipped = tiny_engine.edit(_request(photo, steps=2), cached(backend, just_above))
    computed = tiny_engine.edit(_request(photo, steps=2), cached(backend, just_below))
    assert skipped.extras["first_block_cache"]["skipped"] == 1
    assert computed.extras["first_block_cache"]["skipped"] == 0


def test_para_attn_rule_on_constructed_tensors():
    from para_attn.first_block_cache.utils import are_two_tensors_similar

    import patches.para_attn_first_block_cache  # noqa: F401

    previous = torch.ones(1, 64, 8)
    current = previous * 1.1  # relative mean absolute change: exactly 0.1
    assert are_two_tensors_similar(previous, current, threshold=0.12)
    assert not are_two_tensors_similar(previous, current, threshold=0.08)


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_never_share_cache_state(tiny_engine, photo, backend):
    config = cached(backend, 0.3)
    first = tiny_engine.edit(_request(photo), config)
    other = tiny_engine.edit(EditRequest(prompt="turn it into a watercolor", image=photo.rotate(90), seed=5, steps=8), config)
    with_cfg = tiny_engine.edit(_request(photo, negative_prompt="dark", true_cfg_scale=2.0), config)
    again = tiny_engine.edit(_request(photo), config)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert first.extras["first_block_cache"] == again.extras["first_block_cache"]
    assert other.extras["first_block_cache"]["transformer_calls"] == 8 and with_cfg.extras["first_block_cache"]["transformer_calls"] == 16


def test_backends_agree(tiny_engine, photo):
    results = [tiny_engine.edit(_request(photo), cached(backend, 0.3)) for backend in BACKENDS]
    assert results[0].extras["first_block_cache"]["computed"] == results[1].extras["first_block_cache"]["computed"]
    rel, worst = image_distance(results[0].images[0], results[1].images[0])
    assert rel < 1e-3


def test_auto_backend_is_para_attn_when_installed(tiny_engine, photo):
    result = tiny_engine.edit(_request(photo, steps=2), OptimizationConfig(first_block_cache=True))
    assert result.config.cache_backend == "para_attn"
    assert "para_attn backend" in next(r.detail for r in result.stages if r.name == "first_block_cache")


@pytest.mark.parametrize("module", ["para_attn_first_block_cache", "para_attn_cache_context_per_thread"])
def test_patch_refuses_an_unknown_para_attn_version(monkeypatch, module):
    import importlib
    import importlib.metadata

    import patches

    patch = importlib.import_module(f"patches.{module}")
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.0" if name == "para-attn" else real_version(name))
    patches.installed_version.cache_clear()  # versions are read once per process
    try:
        with pytest.raises(patches.PatchVersionError, match="0.3.38"):
            patch.apply()
    finally:
        patches.installed_version.cache_clear()


def test_each_thread_has_its_own_para_attn_cache_context():
    """A variant's warm-up edit on the build thread and a request on the serving thread each keep
    their own residuals (patches/para_attn_cache_context_per_thread.py)."""
    import threading

    from para_attn.first_block_cache import utils

    import patches.para_attn_cache_context_per_thread  # noqa: F401

    inside, seen = threading.Event(), {}

    def other_thread():
        with utils.cache_context("build thread's"):
            inside.set()
            seen["other"] = utils.get_current_cache_context()

    with utils.cache_context("serving thread's"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        seen["here"] = utils.get_current_cache_context()
    assert inside.is_set() and seen == {"other": "build thread's", "here": "serving thread's"}
    assert utils.get_current_cache_context() is None


@pytest.mark.slow
def test_cache_works_with_compiled_blocks(tiny_engine, photo):
    eager = tiny_engine.edit(_request(photo), cached("para_attn", 0.3))
    compiled = tiny_engine.edit(_request(photo), cached("para_attn", 0.3).with_changes(compile=True))
    assert compiled.active_stages == ["first_block_cache", "compile"]
    assert compiled.extras["first_block_cache"]["computed"] == eager.extras["first_block_cache"]["computed"]
    rel, worst = image_distance(compiled.images[0], eager.images[0])
    assert rel < 1e-2
