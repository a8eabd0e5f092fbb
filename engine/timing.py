"""Timing an edit without stalling the GPU.

On a GPU every mark is a CUDA event recorded on the current stream, so timing adds no
synchronization inside the edit; the engine synchronizes once at the end and reads all the
intervals. On a CPU a mark is simply perf_counter().
"""

from __future__ import annotations

import contextlib
import contextvars
import statistics
import time
from dataclasses import dataclass, field

import torch


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Timings:
    text_encode_s: float = 0.0
    vae_encode_s: float = 0.0
    denoise_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    vae_decode_s: float = 0.0
    total_s: float = 0.0
    variant_build_s: float = 0.0  # > 0 only when this request built its optimization variant
    lora_load_s: float = 0.0  # > 0 only when this request loaded an adapter on first use

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else 0.0

    def as_dict(self) -> dict:
        return {
            "text_encode_s": round(self.text_encode_s, 6),
            "vae_encode_s": round(self.vae_encode_s, 6),
            "denoise_s": round(self.denoise_s, 6),
            "median_step_s": round(self.median_step_s, 6),
            "step_s": [round(s, 6) for s in self.step_s],
            "vae_decode_s": round(self.vae_decode_s, 6),
            "total_s": round(self.total_s, 6),
            "variant_build_s": round(self.variant_build_s, 6),
            "lora_load_s": round(self.lora_load_s, 6),
        }


class EditTimer:
    """Collects marks during one edit; `finish()` synchronizes once and returns Timings."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._spans: dict[str, list[tuple]] = {}
        self._step_starts: list = []
        self._step_ends: list = []
        self._start = clock.mark()

    @contextlib.contextmanager
    def span(self, name: str):
        start = self.clock.mark()
        try:
            yield
        finally:
            self._spans.setdefault(name, []).append((start, self.clock.mark()))

    def transformer_called(self) -> None:
        # With true CFG the transformer runs twice per step; only the first call opens the step.
        if len(self._step_starts) == len(self._step_ends):
            self._step_starts.append(self.clock.mark())

    def step_finished(self) -> None:
        self._step_ends.append(self.clock.mark())

    def finish(self, variant_build_s: float = 0.0, lora_load_s: float = 0.0) -> Timings:
        end = self.clock.mark()
        self.clock.synchronize()
        seconds = self.clock.seconds

        def total(name: str) -> float:
            return sum(seconds(a, b) for a, b in self._spans.get(name, []))

        steps = [seconds(a, b) for a, b in zip(self._step_starts, self._step_ends)]
        denoise = seconds(self._step_starts[0], self._step_ends[-1]) if steps else 0.0
        return Timings(
            text_encode_s=total("text_encode"),
            vae_encode_s=total("vae_encode"),
            denoise_s=denoise,
            step_s=steps,
            vae_decode_s=total("vae_decode"),
            total_s=seconds(self._start, end),
            variant_build_s=variant_build_s,
            lora_load_s=lora_load_s,
        )


_current_timer: contextvars.ContextVar["EditTimer | None"] = contextvars.ContextVar("kontext_edit_timer", default=None)


def _step_started(module, args) -> None:
    timer = _current_timer.get()
    if timer is not None:
        timer.transformer_called()


@contextlib.contextmanager
def instrumented(pipe, timer: EditTimer):
    """Timing marks around the pipeline's own text and VAE encoders and each transformer step.

    The step mark is a hook that stays on the transformer and reads the edit's timer from a context
    variable: a hook added per edit would be copied into any variant cloned from this module while
    the edit runs (a build on another thread), with this edit's timer in it."""
    encode_prompt, encode_vae_image = pipe.encode_prompt, pipe._encode_vae_image

    def timed_encode_prompt(*args, **kwargs):
        with timer.span("text_encode"):
            return encode_prompt(*args, **kwargs)

    def timed_encode_vae_image(*args, **kwargs):
        with timer.span("vae_encode"):
            return encode_vae_image(*args, **kwargs)

    pipe.encode_prompt, pipe._encode_vae_image = timed_encode_prompt, timed_encode_vae_image
    if not getattr(pipe.transformer, "_kontext_step_hook", False):
        pipe.transformer.register_forward_pre_hook(_step_started)
        pipe.transformer._kontext_step_hook = True
    token = _current_timer.set(timer)
    try:
        yield
    finally:
        _current_timer.reset(token)
