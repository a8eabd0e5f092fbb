"""A variant built beside the serving thread on a GPU (service/builds.py), while the serving thread
replays CUDA graphs at a recorded shape and records new ones: the H100 run of 2026-12-06 failed here
three ways (another thread's FX tracing, the process-wide step marks, a capture broken by the
build's synchronize; patches/compile_beside_serving.py and engine.records_cuda_graphs). The tiny
model with FLUX's head size, the full stack (compile, CUDA graphs, FP8 GEMMs and attention, the
fused kernels where the GPU has them). Skipped, with the reason, without a CUDA GPU."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.requests import EditRequest
from patches.compile_beside_serving import install
from patches.cudagraph_trees_thread_state import prepare_thread
from stages.config import cumulative_config
from stages.environment import current_environment
from tests.conftest import image_distance, requires_cuda
from tests.test_gpu_stages import GPU_TEST_TRANSFORMER

pytestmark = [requires_cuda, pytest.mark.gpu]


def test_a_build_beside_replaying_and_recording_edits_breaks_none_of_them(photo):
    install()  # as serve does, before anything is compiled
    config = cumulative_config(5)
    env = current_environment("cuda:0")
    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0", transformer_overrides=GPU_TEST_TRANSFORMER)
    spec = ModelSpec("tiny-hd128", "tiny", random_weights=True, default_max_area=256 * 256, snap_input_to_kontext_resolutions=False)
    engine = KontextEngine(LoadedModel(pipe, spec, torch.device("cuda:0"), torch.bfloat16), env, config, max_variants=3)
    recorded = EditRequest(prompt="make the sky red", image=photo, width=256, height=256, steps=4, seed=3)
    engine.edit(recorded)  # compiles, warms up and records this shape on the serving thread
    reference = engine.edit(recorded)  # replays
    override = engine.resolve(config.with_changes(fuse_qkv=False)).effective
    assert not engine.variant_for(recorded, override)[1]

    failures: list[BaseException] = []

    def build() -> None:
        try:
            prepare_thread()
            engine.build_variant(recorded, override)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            failures.append(error)

    builder = threading.Thread(target=build, name="variant-builds")
    builder.start()
    for _ in range(3):  # replays beside the build, which compiles for many seconds
        again = engine.edit(recorded)
        assert image_distance(again.images[0], reference.images[0])[0] < 1e-3
    assert builder.is_alive(), "the build ended before the replays: nothing ran beside it"
    for width, height in [(192, 256), (256, 192)]:  # records: the first waits for the build (engine.records_cuda_graphs)
        engine.edit(EditRequest(prompt="make the sky red", width=width, height=height, steps=4, seed=4))
    builder.join()
    assert not failures, repr(failures[0])
    assert engine.variant_for(recorded, override)[1]
    built = engine.edit(recorded, override)  # the serving thread runs the built variant: records its own graphs
    assert built.variant["build_s"] == 0.0
    after = engine.edit(recorded)
    assert image_distance(after.images[0], reference.images[0])[0] < 1e-3
