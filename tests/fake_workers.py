"""Stand-ins for the engine in worker-pool tests: a worker process loads one in no time, and a job
logs its start and end, so that a test can tell whether any job ran twice or never."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar


def load_fake_engine(device: str):
    return SimpleNamespace(
        model_info={"name": "fake"},
        loaded=SimpleNamespace(spec=None, device=device),
        default_config=None,
        env=SimpleNamespace(summary=lambda: {"device": device}, has_cuda=False),
        stage_status=lambda: [],
        memory_report=lambda: {},
        memory=lambda: {"device": device},
        variants=SimpleNamespace(report=lambda: [], max_variants=3, residency_pending=False, settle_some=lambda: False),
        builds_beside_edits=False,
        loras=SimpleNamespace(settings=None, loaded=lambda: [], report=lambda with_files=True: {}),
    )


@dataclass
class LoggedCall:
    kind: ClassVar[str] = "inference"
    n: int
    sleep_s: float
    log_path: str
    deadline: float = math.inf

    def run(self, engine, job) -> dict:
        with open(self.log_path, "a") as log:
            log.write(f"start {self.n} {os.getpid()}\n")
        time.sleep(self.sleep_s)
        with open(self.log_path, "a") as log:
            log.write(f"done {self.n} {os.getpid()}\n")
        return {"n": self.n, "pid": os.getpid()}
