"""The three model sources, the save/load round trip, and the errors a user can act on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.engine import KontextEngine
from engine.loading import ModelLoadError, _explain_load_failure, load_model
from engine.model_builders import build_synthetic_full_pipeline
from engine.requests import EditRequest


def test_tiny_model_is_marked_as_random_weights():
    loaded = load_model("tiny", "cpu")
    assert loaded.spec.random_weights and "RANDOM" in loaded.spec.warning
    assert loaded.pipe.transformer.config.guidance_embeds  # Kontext-dev is guidance-distilled


def test_saved_tiny_model_loads_back_through_the_hub_code_path(tmp_path, tiny_engine, photo):
    tiny_engine.loaded.pipe.save_pretrained(tmp_path)
    reloaded = KontextEngine.load(str(tmp_path), "cpu")
    assert reloaded.loaded.spec.source == "local"
    assert reloaded.loaded.spec.random_weights, "a saved tiny model is still random weights"
    request = EditRequest(prompt="make the sky red", image=photo, seed=5, steps=4)
    original = np.asarray(tiny_engine.edit(request).images[0])
    roundtrip = np.asarray(reloaded.edit(request).images[0])
    assert np.array_equal(original, roundtrip)


def test_synthetic_full_has_the_real_architecture_on_meta():
    pipe = build_synthetic_full_pipeline(device="meta")
    transformer_params = sum(p.numel() for p in pipe.transformer.parameters())
    assert 11.85e9 < transformer_params < 11.95e9  # FLUX.1-Kontext-dev: 11.90 B
    assert pipe.transformer.config.guidance_embeds
    assert len(pipe.transformer.transformer_blocks) == 19 and len(pipe.transformer.single_transformer_blocks) == 38
    t5_params = sum(p.numel() for p in pipe.text_encoder_2.parameters())
    assert 4.6e9 < t5_params < 4.9e9  # T5-XXL encoder
    assert pipe.vae.config.latent_channels == 16
    assert next(pipe.transformer.parameters()).dtype == torch.bfloat16


def test_synthetic_full_refuses_a_cpu():
    with pytest.raises(ModelLoadError, match="GPU"):
        load_model("synthetic-full", "cpu")


def test_unknown_sources_explain_themselves(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a directory nor a Hugging Face repo id"):
        load_model("not-a-model", "cpu")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(str(tmp_path), "cpu")


def test_hub_model_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as caught:
        load_model("black-forest-labs/FLUX.1-Kontext-dev", "cpu")
    message = str(caught.value)
    assert "HF_TOKEN" in message and "--model tiny" in message


def test_gated_repo_message_names_the_license_and_token():
    import httpx
    from huggingface_hub.errors import GatedRepoError

    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
    try:
        try:
            raise GatedRepoError("403 gated", response=response)
        except GatedRepoError as inner:
            raise OSError("diffusers could not load") from inner
    except OSError as error:
        message = _explain_load_failure("black-forest-labs/FLUX.1-Kontext-dev", None, error)
    assert "accept its license" in message.lower() and "HF_TOKEN is not set" in message
