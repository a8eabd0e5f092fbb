"""CUDA graphs for the text encoders: T5 and CLIP replayed as one graph each.

Eager, T5-XXL at 512 tokens is about a thousand kernel launches for a few milliseconds of GEMMs, so
the host sets its pace (the stage table's text-encoding column), while the compiled denoiser
replays its blocks as graphs. Both encoders always see one shape (the pipeline pads T5 to 512
tokens and CLIP to 77, one prompt at a time), so one graph each, recorded by the first edit that
records the blocks' graphs, serves every request after it. The kernels are the eager ones, so the
embeddings are the same bit for bit (tests/test_text_encoder_graphs_gpu.py).

Rules, the blocks' own (engine._edit decides):
- only edits on the serving thread use them (one at a time, under the engine's lock): a build's edit
  beside it runs the encoders eagerly, so two threads never replay the same graph;
- a graph is recorded only by an edit that holds the build lock (one that records the blocks'
  graphs), since a build's GPU work beside a capture would invalidate it;
- an encoder that fails to record runs eagerly from then on, and says why once in the log.

Memory: the graphs' private pool holds one forward's activations (for T5-XXL, one layer's float32
attention scores and its feed-forward), and the warm-up calls leave their freed blocks cached for
the side stream they ran on; the tiny model's reserved memory grew by more than its activations
(benchmarks/results/nvidia-h100-80gb-hbm3-2026-12-07). Memory tiers that keep the encoders off the
GPU (offloaded, cpu) get no graphs and no pool.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

# None: eager; "replay": replay recorded graphs; "record": replay, and record those not recorded yet
_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("kontext_text_encoder_graphs", default=None)
_report: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kontext_text_encoder_graphs_report", default=None)

WARMUP_CALLS = 2  # eager calls on a side stream before capture: cuBLAS handles and workspaces exist by then


@dataclass
class Recorded:
    """One encoder call captured: write the input into `static_input`, `replay()`, read `static_output`."""

    replay: Callable[[], None]
    static_input: torch.Tensor
    static_output: object  # the encoder's ModelOutput, its tensors in the graph's pool


def record_cuda_graph(forward: Callable, input_ids: torch.Tensor, kwargs: dict, pool) -> Recorded:
    """Capture `forward(input_ids, **kwargs)` in a CUDA graph (torch's recipe: warm-up calls on a side
    stream, then the capture)."""
    static_input = input_ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            forward(static_input, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_output = forward(static_input, **kwargs)
    return Recorded(graph.replay, static_input, static_output)


class GraphedEncoder:
    """Stands in for one text encoder's `forward`: replays its graph for the call shape it was
    recorded at, and calls the eager forward otherwise."""

    def __init__(self, name: str, module: torch.nn.Module, pool, record: Callable = record_cuda_graph):
        self.name = name
        self.eager_forward = module.forward
        self.pool = pool
        self.record = record
        self.recorded: dict[tuple, Recorded | None] = {}  # call key -> graph, or None where recording failed

    def __call__(self, input_ids, **kwargs):
        mode = _mode.get()
        key = _call_key(input_ids, kwargs)
        if mode is None or key is None:
            return self.eager_forward(input_ids, **kwargs)
        if key not in self.recorded:
            if mode != "record":
                return self._eager("eager (not recorded yet)", input_ids, kwargs)
            self.recorded[key] = self._record(input_ids, kwargs)
            _say(self.name, "recorded" if self.recorded[key] else "eager (recording failed)")
        recorded = self.recorded[key]
        if recorded is None:
            return self._eager("eager (recording failed)", input_ids, kwargs)
        recorded.static_input.copy_(input_ids)
        recorded.replay()
        _say(self.name, "replayed", unless_said=True)
        # the next replay overwrites the outputs, and the pipeline keeps the embeddings for the edit
        return _cloned(recorded.static_output)

    def _eager(self, what: str, input_ids, kwargs):
        _say(self.name, what)
        return self.eager_forward(input_ids, **kwargs)

    def _record(self, input_ids: torch.Tensor, kwargs: dict) -> Recorded | None:
        try:
            return self.record(self.eager_forward, input_ids, kwargs, self.pool)
        except Exception as error:  # noqa: BLE001 - an encoder that cannot be captured still encodes, eagerly
            log.warning("text encoder %s: CUDA graph not recorded, it runs eagerly (%s: %s)", self.name, type(error).__name__, error)
            return None


class TextEncoderGraphs:
    """The pipeline's text encoders (`text_encoder`: CLIP, `text_encoder_2`: T5) with graphs, one
    shared memory pool. Installed once per loaded model; variants share the encoders."""

    def __init__(self, pipe, record: Callable = record_cuda_graph):
        pool = torch.cuda.graph_pool_handle() if record is record_cuda_graph else None
        self.encoders: list[GraphedEncoder] = []
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                graphed = GraphedEncoder(name, module, pool, record)
                module.forward = graphed  # nn.Module.__call__ finds the instance attribute first
                self.encoders.append(graphed)


@contextlib.contextmanager
def use_graphs(may_record: bool, report: dict) -> Iterator[None]:
    """Within: graphed encoders replay their graphs (recording them first where `may_record`), and
    `report[name]` says what each did."""
    mode_token = _mode.set("record" if may_record else "replay")
    report_token = _report.set(report)
    try:
        yield
    finally:
        _mode.reset(mode_token)
        _report.reset(report_token)


def _call_key(input_ids, kwargs: dict) -> tuple | None:
    """What a graph is recorded for: the token ids' shape, dtype and device and the (plain) keyword
    arguments; None for a call a graph cannot stand for (tensors among the arguments)."""
    if not isinstance(input_ids, torch.Tensor):
        return None
    if any(isinstance(value, torch.Tensor) for value in kwargs.values()):
        return None
    try:
        frozen = tuple(sorted(kwargs.items()))
        hash(frozen)
    except TypeError:
        return None
    return tuple(input_ids.shape), input_ids.dtype, input_ids.device, frozen


def _cloned(output):
    if output is None:
        return None
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return type(output)(_cloned(part) for part in output)
    return type(output)(**{name: _cloned(value) for name, value in output.items()})  # a transformers ModelOutput


def _say(name: str, what: str, unless_said: bool = False) -> None:
    report = _report.get()
    if report is not None and not (unless_said and name in report):
        report[name] = what
