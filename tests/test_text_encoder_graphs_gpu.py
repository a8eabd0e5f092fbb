"""engine/text_encoder_graphs.py on a GPU: T5 and CLIP recorded as CUDA graphs give the eager
embeddings bit for bit, for a prompt other than the one they were recorded with; the graphs' memory
pool and the encode time eager and replayed are printed (pytest -s) for the results. An edit on the
full stack records them with the blocks and the next replays them, with the same picture. Skipped, with
the reason, without a CUDA GPU."""

from __future__ import annotations

import time

import pytest
import torch

from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.requests import EditRequest
from engine.text_encoder_graphs import TextEncoderGraphs, use_graphs
from stages.config import cumulative_config
from stages.environment import current_environment
from tests.conftest import requires_cuda
from tests.test_gpu_stages import GPU_TEST_TRANSFORMER

pytestmark = [requires_cuda, pytest.mark.gpu]


def _encode(pipe, prompt: str):
    prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=torch.device("cuda:0"))
    return prompt_embeds, pooled


def _encode_seconds(pipe, prompt: str, repeats: int = 5) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        _encode(pipe, prompt)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def test_replayed_encoders_give_the_eager_embeddings():
    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0")
    with torch.no_grad():
        eager = {prompt: _encode(pipe, prompt) for prompt in ("make the sky red", "a cat in a hat")}
        eager_s = _encode_seconds(pipe, "a cat in a hat")
        TextEncoderGraphs(pipe)
        reserved = torch.cuda.memory_reserved()
        first_report, second_report = {}, {}
        with use_graphs(may_record=True, report=first_report):
            recorded = _encode(pipe, "make the sky red")
        pool_mb = (torch.cuda.memory_reserved() - reserved) / 2**20
        with use_graphs(may_record=False, report=second_report):
            replayed = _encode(pipe, "a cat in a hat")
            replayed_s = _encode_seconds(pipe, "a cat in a hat")
    assert first_report == {"text_encoder": "recorded", "text_encoder_2": "recorded"}
    assert second_report == {"text_encoder": "replayed", "text_encoder_2": "replayed"}
    for mine, reference in zip(recorded + replayed, eager["make the sky red"] + eager["a cat in a hat"], strict=True):
        assert torch.equal(mine, reference)
    print(f"tiny encoders: eager {eager_s * 1e3:.2f} ms, replayed {replayed_s * 1e3:.2f} ms, graph pool +{pool_mb:.1f} MiB reserved")


def test_the_full_stack_records_the_encoders_with_the_blocks_and_replays_them():
    env = current_environment()
    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0", transformer_overrides=GPU_TEST_TRANSFORMER)
    spec = ModelSpec("tiny-hd128", "tiny", random_weights=True, default_max_area=256 * 256, snap_input_to_kontext_resolutions=False)
    engine = KontextEngine(LoadedModel(pipe, spec, torch.device("cuda:0"), torch.bfloat16), env, cumulative_config(5), max_variants=2)
    assert engine.text_encoder_graphs is not None
    request = EditRequest(prompt="make the sky red", width=256, height=256, steps=4, seed=3)
    first = engine.edit(request)
    assert first.variant["cuda_graphs"] == "recorded"
    assert first.extras["text_encoder_graphs"] == {"text_encoder": "recorded", "text_encoder_2": "recorded"}
    second = engine.edit(request)
    assert second.extras["text_encoder_graphs"] == {"text_encoder": "replayed", "text_encoder_2": "replayed"}
    assert second.images[0].tobytes() == first.images[0].tobytes()
    recording, replayed = first.timings.text_encode_s * 1e3, second.timings.text_encode_s * 1e3
    print(f"full stack: text encoding {recording:.2f} ms in the recording edit, {replayed:.2f} ms replayed")
