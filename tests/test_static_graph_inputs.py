"""The CUDA-graph stage's static inputs (stages/cuda_graphs.py, `graph_inputs="static"`): the step's
time embedding and RoPE tables land in buffers at fixed addresses, one per thread and shape, marked
for Dynamo as static, and the transformer computes exactly what it computed without them. (That the
graphs then read them in place, with no per-block copy, shows in the GPU stage profile's
"Memcpy DtoD" count: benchmarks/gpu_session.sh stages.)"""

from __future__ import annotations

import copy
import threading

import torch

from stages.config import OptimizationConfig, cumulative_config
from stages.cuda_graphs import StaticInputs, hold_block_inputs_static


def test_a_buffer_per_name_and_shape_reused_and_rewritten():
    inputs = StaticInputs()
    first = inputs.hold("temb", torch.ones(1, 8))
    again = inputs.hold("temb", torch.full((1, 8), 3.0))
    assert again is first and torch.equal(first, torch.full((1, 8), 3.0))
    assert getattr(first, "_dynamo_static_input_type", None) == "unguarded"  # static for cudagraphs, no recompile per buffer
    assert inputs.hold("temb", torch.ones(1, 16)) is not first  # another shape: another recording, another buffer
    assert inputs.hold("cos", torch.ones(1, 8)) is not first


def test_each_thread_holds_its_own_buffers():
    # graphs are recorded per thread: a build beside the serving thread must not overwrite what the
    # serving thread's graphs read
    inputs = StaticInputs()
    mine = inputs.hold("temb", torch.ones(2))
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(inputs.hold("temb", torch.zeros(2))))
    thread.start()
    thread.join()
    assert theirs[0] is not mine and torch.equal(mine, torch.ones(2))


def _transformer_inputs(transformer, generator):
    config = transformer.config
    image, text = 12, 5
    inputs = {
        "hidden_states": torch.randn(1, image, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.7]),
        "img_ids": torch.randint(0, 4, (image, 3), generator=generator).float(),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([2.5])
    return inputs


def test_the_blocks_read_the_held_embeddings_and_compute_the_same(tiny_engine):
    stock = tiny_engine.loaded.pipe.transformer
    held = copy.deepcopy(stock)
    assert hold_block_inputs_static(held) == 2 and hold_block_inputs_static(held) == 0  # hooked once
    seen = []
    held.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["temb"], kwargs["image_rotary_emb"])), with_kwargs=True
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(2):  # two steps: the second writes the same buffers
            inputs = _transformer_inputs(stock, generator)
            (expected,) = stock(**inputs)
            (got,) = held(**inputs)
            assert torch.equal(got, expected)
    (temb, rope), (temb_again, rope_again) = seen
    assert temb is temb_again and rope[0] is rope_again[0] and rope[1] is rope_again[1]
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in (temb, *rope))


def test_static_inputs_come_with_the_cuda_graph_preset():
    assert cumulative_config(5).graph_inputs == "static"
    assert cumulative_config(4).graph_inputs == OptimizationConfig().graph_inputs == "copied"
