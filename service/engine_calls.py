"""What a job asks of the engine, as a small picklable object, so that one job runs either on the
in-process GPU worker (bound to the engine there by `Service.engine_call`) or in a worker process
of `serve --gpus`, which runs it on its own engine (service/worker_process.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.lora_files import LoraError
from engine.requests import EditRequest, EditResult
from stages.config import OptimizationConfig

from .queue import JobRefused


@dataclass
class EditCall:
    request: EditRequest  # the decoded input image travels as pixels (PIL pickles its raw bytes)
    config: OptimizationConfig
    deadline: float  # time.monotonic(): one clock for every process of a Linux host

    def run(self, engine) -> EditResult:
        # Past the deadline nobody waits for the answer: stop at the next step instead of finishing.
        try:
            return engine.edit(self.request, self.config, should_stop=lambda: time.monotonic() > self.deadline)
        except LoraError as refused:  # the request's adapter was unloaded before its turn: a 4xx, not a crash
            raise JobRefused(refused) from None
