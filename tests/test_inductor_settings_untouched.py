"""Quantizing leaves Inductor's process-wide settings alone: torchao's configs default to
set_inductor_config=True, which turns on coordinate-descent tuning for every later compile (the VAE's
too, where it re-tunes dynamic-shape kernels at run time for minutes). The compile stage owns those
settings; these tests fail if a torchao config built by the project would change them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")


def _project_torchao_configs():
    from stages.low_precision import torchao_config
    from stages.text_encoder_fp8 import text_encoder_fp8_config
    from stages.transformer_fp8 import weight_config

    yield "text_encoder_fp8", text_encoder_fp8_config()
    for fmt in ("rowwise", "weight_only"):
        yield f"transformer_fp8 {fmt}", weight_config(fmt)
    yield "quantization fp8", torchao_config("fp8", (9, 0))


@pytest.mark.parametrize("name_config", list(_project_torchao_configs()), ids=lambda pair: pair[0])
def test_no_project_torchao_config_asks_to_set_inductor_settings(name_config):
    name, config = name_config
    assert getattr(config, "set_inductor_config", False) is False, f"{name} would change Inductor's settings"


def test_quantizing_a_text_encoder_leaves_coordinate_descent_tuning_off():
    import torch._inductor.config as inductor_config

    from stages.text_encoder_fp8 import quantize_text_encoder_fp8

    encoder = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 32, bias=False)).to(torch.bfloat16)
    before = (inductor_config.coordinate_descent_tuning, inductor_config.coordinate_descent_check_all_directions)
    saved = quantize_text_encoder_fp8(encoder)
    assert saved > 0  # it did quantize
    assert (inductor_config.coordinate_descent_tuning, inductor_config.coordinate_descent_check_all_directions) == before
    assert before == (False, False)


def test_the_compile_stage_names_a_process_wide_tuning_setting_before_it_slows_a_compile(caplog):
    import torch._inductor.config as inductor_config

    from stages.base import BuildContext
    from stages.compile import Compile, slow_compile_settings
    from stages.config import OptimizationConfig
    from stages.environment import current_environment

    vae = torch.nn.Module()
    vae.encoder, vae.decoder = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    build = BuildContext(env=current_environment("cpu"), device=torch.device("cpu"), dtype=torch.float32)
    Compile().apply_vae(vae, OptimizationConfig(), build)
    assert slow_compile_settings() == [] and not any("process-wide" in note for note in build.notes)

    build = BuildContext(env=current_environment("cpu"), device=torch.device("cpu"), dtype=torch.float32)
    # what torchao's default did; patch() restores the setting (monkeypatch.setattr broke Inductor's config)
    with inductor_config.patch(coordinate_descent_tuning=True), caplog.at_level("WARNING", logger="stages.compile"):
        Compile().apply_vae(vae, OptimizationConfig(), build)
    assert any("coordinate_descent_tuning" in note for note in build.notes)
    assert "coordinate_descent_tuning" in caplog.text
    assert slow_compile_settings() == []  # restored for the tests after this one
