"""engine/text_encoder_graphs.py on the CPU: when the encoders record, replay or run eagerly, that a
replay answers for new token ids, that answers never share the graph's buffers, that a failed
recording leaves the encoder eager, and the engine's wiring (the blocks' rule: record only in an
edit that records the blocks' graphs). CUDA graphs need a GPU, so a stand-in recorder plays the
graph here: it keeps the static buffers and rewrites them in place on each replay, as a graph does.
The real graphs: tests/test_text_encoder_graphs_gpu.py."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.engine import KontextEngine
from engine.loading import LoadedModel
from engine.model_builders import build_tiny_pipeline
from engine.model_specs import ModelSpec
from engine.requests import EditRequest
from engine.text_encoder_graphs import GraphedEncoder, Recorded, TextEncoderGraphs, use_graphs


class StandInRecorder:
    """Records as a CUDA graph would: outputs in static tensors, rewritten in place by `replay`."""

    def __init__(self, fail: bool = False):
        self.fail, self.records, self.replays = fail, 0, 0

    def __call__(self, forward, input_ids, kwargs, pool) -> Recorded:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.records += 1
        static_input = input_ids.clone()
        static_output = forward(static_input, **kwargs)

        def replay():
            self.replays += 1
            fresh = forward(static_input, **kwargs)
            for name, value in fresh.items():
                static_output[name].copy_(value)

        return Recorded(replay, static_input, static_output)


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)

    def forward(self, input_ids, scale: float = 1.0):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        hidden = self.embed(input_ids) * scale
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden.mean(dim=1))


def _ids(*values):
    return torch.tensor([list(values)])


@pytest.fixture
def graphed():
    torch.manual_seed(0)
    module, recorder = Encoder(), StandInRecorder()
    encoder = GraphedEncoder("text_encoder_2", module, None, recorder)
    module.forward = encoder
    return module, encoder, recorder


def test_outside_an_edit_that_uses_graphs_the_encoder_is_eager(graphed):
    module, encoder, recorder = graphed
    module(_ids(1, 2, 3))
    report = {}
    with use_graphs(False, report):  # an edit that may replay, with nothing recorded yet
        module(_ids(1, 2, 3))
    assert recorder.records == 0 and recorder.replays == 0
    assert report == {"text_encoder_2": "eager (not recorded yet)"}


def test_an_edit_that_records_records_once_and_later_edits_replay_for_their_own_tokens(graphed):
    module, encoder, recorder = graphed
    eager = Encoder.forward
    first_report, second_report = {}, {}
    with use_graphs(True, first_report):
        first = module(_ids(1, 2, 3), scale=2.0)
    assert first_report == {"text_encoder_2": "recorded"} and recorder.records == 1 and recorder.replays == 1
    assert torch.equal(first.last_hidden_state, eager(module, _ids(1, 2, 3), scale=2.0).last_hidden_state)
    with use_graphs(False, second_report):
        second = module(_ids(4, 5, 6), scale=2.0)
    assert second_report == {"text_encoder_2": "replayed"} and recorder.records == 1 and recorder.replays == 2
    assert torch.equal(second.pooler_output, eager(module, _ids(4, 5, 6), scale=2.0).pooler_output)
    # answers are copies: the second replay did not change the first answer, and writing to one is harmless
    assert torch.equal(first.last_hidden_state, eager(module, _ids(1, 2, 3), scale=2.0).last_hidden_state)
    second.last_hidden_state.zero_()
    with use_graphs(False, {}):
        third = module(_ids(4, 5, 6), scale=2.0)
    assert torch.equal(third.pooler_output, eager(module, _ids(4, 5, 6), scale=2.0).pooler_output)


def test_another_shape_or_other_arguments_are_another_graph(graphed):
    module, encoder, recorder = graphed
    with use_graphs(True, {}):
        module(_ids(1, 2, 3))
    report = {}
    with use_graphs(False, report):
        module(_ids(1, 2, 3, 4))  # another length: not recorded, and this edit may not record
        module(_ids(1, 2, 3), scale=3.0)
    assert recorder.records == 1 and report == {"text_encoder_2": "eager (not recorded yet)"}
    with use_graphs(True, {}):
        module(_ids(1, 2, 3, 4))
    assert recorder.records == 2 and len(encoder.recorded) == 2


def test_tensor_arguments_are_never_graphed(graphed):
    module, encoder, recorder = graphed
    with use_graphs(True, {}):
        module(_ids(1, 2), scale=torch.tensor(2.0))
    assert recorder.records == 0 and not encoder.recorded


def test_an_encoder_that_fails_to_record_stays_eager_and_says_why_once(caplog):
    module = Encoder()
    recorder = StandInRecorder(fail=True)
    module.forward = GraphedEncoder("text_encoder", module, None, recorder)
    reports = [{}, {}]
    with caplog.at_level(logging.WARNING, logger="engine.text_encoder_graphs"):
        for report in reports:
            with use_graphs(True, report):
                out = module(_ids(7, 8))
            assert torch.equal(out.last_hidden_state, Encoder.forward(module, _ids(7, 8)).last_hidden_state)
    assert reports == [{"text_encoder": "eager (recording failed)"}] * 2
    assert len([record for record in caplog.records if "not recorded" in record.message]) == 1


@pytest.fixture(scope="module")
def graphed_engine():
    """The tiny model on an engine of its own (its encoders get stand-ins), seen as capturing CUDA
    graphs as on a GPU: the first edit at a shape records, later ones replay."""
    spec = ModelSpec("tiny", "tiny", random_weights=True, default_max_area=128 * 128, snap_input_to_kontext_resolutions=False)
    from stages.environment import current_environment

    engine = KontextEngine(LoadedModel(build_tiny_pipeline(), spec, torch.device("cpu"), torch.float32), current_environment("cpu"))
    engine.recorder = StandInRecorder()
    engine.text_encoder_graphs = TextEncoderGraphs(engine.loaded.pipe, engine.recorder)
    engine.records_cuda_graphs = lambda prepared: (
        engine.shape_of(prepared.request, prepared.width, prepared.height) not in prepared.variant.shapes_run
    )
    engine._graph_use = lambda prepared, records, deferred: "recorded" if records else "replayed"
    return engine


def test_the_edit_that_records_the_blocks_records_the_encoders_and_the_next_replays(graphed_engine):
    engine = graphed_engine
    request = EditRequest(prompt="make the sky red", width=128, height=128, steps=2, seed=1)
    first = engine.edit(request)
    assert first.extras["text_encoder_graphs"] == {"text_encoder": "recorded", "text_encoder_2": "recorded"}
    assert engine.recorder.records == 2
    second = engine.edit(EditRequest(prompt="make the sky green", width=128, height=128, steps=2, seed=1))
    assert second.extras["text_encoder_graphs"] == {"text_encoder": "replayed", "text_encoder_2": "replayed"}
    again = engine.edit(request)
    assert again.images[0].tobytes() == first.images[0].tobytes()
    assert again.images[0].tobytes() != second.images[0].tobytes()  # the replay encoded the new prompt
    engine._graph_use = lambda prepared, records, deferred: None  # a variant that captures no graphs
    eager = engine.edit(request)
    assert "text_encoder_graphs" not in eager.extras and eager.images[0].tobytes() == first.images[0].tobytes()


def test_a_build_beside_the_serving_thread_runs_the_encoders_eagerly(graphed_engine):
    engine = graphed_engine
    records, replays = engine.recorder.records, engine.recorder.replays
    engine.build_variant(EditRequest(prompt="warm", width=96, height=96, steps=2, seed=0))
    assert (engine.recorder.records, engine.recorder.replays) == (records, replays)


def test_no_gpu_no_graphed_encoders(tiny_engine):
    assert tiny_engine.text_encoder_graphs is None
    assert not isinstance(tiny_engine.loaded.pipe.text_encoder_2.forward, GraphedEncoder)
