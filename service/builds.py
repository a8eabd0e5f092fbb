"""The build lane: a request whose variant is not ready waits here while its variant is built, and
compiled by a one-step edit of its shape, on a thread of its own (engine.build_variant); the
worker's thread meanwhile serves the requests whose variants are ready. When the build is done the
request rejoins the front of the queue. So a request on a resident variant waits at most for the
edit that is running, never for another request's build or first compile.

Why a thread, and not reordering alone: a build that has started on the serving thread cannot be
interrupted (Dynamo and Inductor compile inside the first call), so every request arriving during
it would wait for all of it: 26.8 s for a plain request behind a `quantization: none` override on an
H200 (issue 26). On a GPU the two threads share the device: the warm-up edit's kernels interleave
with the served edits' kernels (compile itself is CPU work, in this process and Inductor's compile
workers); its CUDA graphs are recorded on the serving thread, at the first served edit, as each
thread records its own. The build thread gets CUDA graph trees of its own first
(patches/cudagraph_trees_thread_state.py: torch 2.11 gives them only to the thread that imported
Inductor's, and every build here failed on an H100 without it), and torch's FX tracing flag and
CUDA graph step marks count per thread (patches/compile_beside_serving.py, installed at start: with
them process-wide, the build's tracing failed the serving thread's compiled calls, and the serving
thread's step marks freed the build's warm-up outputs, on an H100). Engines whose weights move during
an edit (group offload) do not build beside edits (engine.builds_beside_edits), nor does a server
started with --no-background-builds: their builds run in turn with edits, as before.

Builds are what a client can make the server do at will, so each client (by address) may cause at
most --variant-builds-per-hour of them: a request beyond that gets 429 with Retry-After before
anything is built. Requests for a variant already being built wait for that build, and cost nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict, deque
from typing import Any, Callable

from .engine_calls import EditCall
from .jobs import BuildLimit

log = logging.getLogger("flux_kontext.service.builds")

WINDOW_S = 3600.0


class BuildRate:
    """At most `per_hour` builds per client in any hour (0: no limit)."""

    def __init__(self, per_hour: int):
        self.per_hour = per_hour
        self._builds: dict[str, deque[float]] = defaultdict(deque)

    def charge(self, client: str) -> None:
        """Count a build against `client`, or raise BuildLimit (nothing counted) when it has had its share."""
        if self.per_hour <= 0:
            return
        now = time.monotonic()
        builds = self._builds[client]
        while builds and builds[0] <= now - WINDOW_S:
            builds.popleft()
        if len(builds) >= self.per_hour:
            retry_after = max(1, math.ceil(builds[0] + WINDOW_S - now))
            raise BuildLimit(
                f"this client has had {self.per_hour} optimization variants built in the last hour (serve --variant-builds-per-hour); "
                f"use the server's default optimizations, a variant built already, or retry after {retry_after} s",
                retry_after,
            )
        builds.append(now)


class BuildLane:
    def __init__(self, engine, settings, rejoin: Callable[[Any], None]):
        """`rejoin(token)` is called on the lane's thread when the variant a diverted call waited for
        is built; the call then carries the build's seconds (`build_s`; None when the build failed:
        the call runs anyway, builds the variant itself and fails the way a build fails)."""
        self.engine, self.rejoin = engine, rejoin
        self.enabled = settings.background_builds and engine.builds_beside_edits
        self.rate = BuildRate(settings.variant_builds_per_hour)
        self._cond = threading.Condition()
        self._waiting: dict[tuple, list] = {}  # variant key -> (token, call) of the calls waiting for it
        self._order: deque[tuple[tuple, EditCall]] = deque()
        self._thread: threading.Thread | None = None

    def divert(self, token, call) -> bool:
        """True when `call` will wait here for its variant (then `rejoin(token)` follows once), False
        when it can run now. Raises BuildLimit when its client may cause no more builds."""
        if not self.enabled or not isinstance(call, EditCall) or call.waited_for_build:
            return False
        key, ready = self.engine.variant_for(call.request, call.config)
        if ready:
            return False
        with self._cond:
            if key in self._waiting:  # being built for another request already
                self._waiting[key].append((token, call))
                return True
            self.rate.charge(call.client)
            self._waiting[key] = [(token, call)]
            self._order.append((key, call))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="variant-builds", daemon=True)
                self._thread.start()
            self._cond.notify()
        return True

    @property
    def building(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _loop(self) -> None:
        if self.engine.loaded.device.type == "cuda":
            from patches.cudagraph_trees_thread_state import prepare_thread

            log.info("build thread: %s", prepare_thread())
        while True:
            with self._cond:
                while not self._order:
                    self._cond.wait()
                key, call = self._order.popleft()
            seconds = None
            try:
                seconds = self.engine.build_variant(call.request, call.config)
                log.info("variant built and compiled beside the serving thread in %.1f s: %s", seconds, dict(key))
            except BaseException as error:  # noqa: BLE001 - the waiting calls run anyway and fail the way the build fails
                why = f"{type(error).__name__}: {error}"
                log.warning("a variant build beside the serving thread failed (%s); its requests build it in turn", why, exc_info=True)
            with self._cond:
                waiting = self._waiting.pop(key, [])
            for token, waited in waiting:
                waited.waited_for_build, waited.build_s = True, seconds
                self.rejoin(token)
