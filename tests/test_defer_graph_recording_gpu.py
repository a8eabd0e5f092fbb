"""serve --defer-graph-recording on a GPU: a shape's first request runs the compiled blocks without
CUDA graphs (patches/cudagraph_trees_bypass.py) and records none, its second records them, its
third replays them, and all three draw the same picture. The tiny model with FLUX's head size, the
full stack (compile, CUDA graphs, FP8 GEMMs and attention, the fused kernels where the GPU has
them). Skipped, with the reason, without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.requests import EditRequest
from patches.cudagraph_trees_bypass import install
from stages.config import cumulative_config
from stages.environment import current_environment
from tests.conftest import image_distance, requires_cuda
from tests.test_gpu_stages import GPU_TEST_TRANSFORMER

pytestmark = [requires_cuda, pytest.mark.gpu]


def _recorded_graphs() -> int:
    """CUDA graphs this thread's tree manager holds for device 0 (roots and their descendants)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_container(0).tree_manager
    if manager is None:
        return 0
    nodes, count = list(manager.get_roots()), 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes.extend(child for children in node.children.values() for child in children)
    return count


def test_a_shapes_first_request_records_nothing_its_second_records_and_the_pictures_agree(photo):
    install()
    env = current_environment("cuda:0")
    pipe = build_tiny_pipeline(dtype=torch.bfloat16, device="cuda:0", transformer_overrides=GPU_TEST_TRANSFORMER)
    spec = ModelSpec("tiny-hd128", "tiny", random_weights=True, default_max_area=256 * 256, snap_input_to_kontext_resolutions=False)
    engine = KontextEngine(LoadedModel(pipe, spec, torch.device("cuda:0"), torch.bfloat16), env, cumulative_config(5), max_variants=3)
    engine.defer_graph_recording = True
    warm = EditRequest(prompt="make the sky red", image=photo, width=256, height=256, steps=4, seed=3)
    assert engine.edit(warm, warm_up=True).variant["cuda_graphs"] == "recorded"  # compiles; as the server's first shape
    recorded_before = _recorded_graphs()
    assert recorded_before > 0

    request = EditRequest(prompt="make the sky red", width=192, height=256, steps=4, seed=4)  # a shape not run yet
    first = engine.edit(request)
    assert first.variant["cuda_graphs"] == "deferred"
    assert _recorded_graphs() == recorded_before, "the deferred request recorded CUDA graphs"
    second = engine.edit(request)
    assert second.variant["cuda_graphs"] == "recorded" and _recorded_graphs() > recorded_before
    third = engine.edit(request)
    assert third.variant["cuda_graphs"] == "replayed"
    for later in (second, third):
        assert image_distance(later.images[0], first.images[0])[0] < 1e-3
