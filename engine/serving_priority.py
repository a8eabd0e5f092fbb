"""Keeping the serving thread fed while a variant is built beside it.

Every torch call the serving thread makes releases the GIL and takes it back afterwards (each block's
CUDA-graph replay is one). While another thread runs Python (a build's Dynamo tracing and Inductor
code generation), CPython gives the GIL back to a waiting thread only after the switch interval,
5 ms by default: about 800 block calls per 14-step edit made a plain edit beside a build take 6.58 s
instead of 2.58 s (H100, 2026-12-06, benchmarks/fair_service.py). `benchmarks/gil_handoff.py` shows
the same on any CPU: 800 torch calls beside a Python-busy thread take seconds at 5 ms and tens of
milliseconds at 0.2 ms, while the busy thread keeps most of its speed.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

# The interval while a build runs beside the serving thread: each of the serving thread's calls waits
# at most this long for the GIL (0.2 ms x 800 calls: under 0.2 s per edit at worst).
BUILD_SWITCH_INTERVAL_S = 0.0002


@contextlib.contextmanager
def serving_thread_first() -> Iterator[None]:
    """Shorten the GIL's switch interval for the duration (process-wide; builds take turns, so one
    build sets and restores it at a time)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, BUILD_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
