"""The service's limits and policies: one object, filled from `serve`'s command line.

Every limit exists to keep one bad or greedy request from hurting the others: the queue bounds
memory and latency, the pixel caps bound GPU memory, the body cap and the body timeout bound what
a client can make the server read and for how long, the request timeout bounds how long a client
waits, the drain timeout bounds how long a shutdown takes.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

API_KEY_ENV_DEFAULT = "FLUX_KONTEXT_API_KEY"
MB = 1024 * 1024
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServiceSettings:
    queue_size: int = 16  # jobs waiting behind the running one; beyond: 429 + Retry-After
    request_timeout_s: float = 120.0  # from arrival to answer, queued time included; beyond: 504
    # SIGTERM: the process exits at most this many seconds later, whatever its clients do. Accepted
    # work gets that long to finish (by default a request's own timeout plus 10 s of margin).
    drain_timeout_s: float | None = None
    body_timeout_s: float = 30.0  # a client must send its whole body within this; beyond: 408
    max_body_bytes: int = 32 * MB  # whole request body, checked while it is read
    max_input_pixels: int = 4096 * 4096  # decoded input image; Pillow's bomb warning is an error too
    min_input_side: int = 16  # a 1x1 input is not an image to edit
    max_output_pixels: int = 2048 * 2048  # width * height * num_images per request
    min_size: int | None = None  # output side; None: 256 for real (Kontext-resolution) models, 16 otherwise
    max_size: int = 2048
    max_steps: int = 50
    default_steps: int | None = None  # steps when a request gives none; None: the scheduler's (28 Euler, 14 DPM-Solver++)
    max_images: int = 4
    per_request_variants: bool = True  # requests may ask for build-time stages (compile: minutes per new shape)
    warmup: bool = True  # edits with the default config at every reachable shape before /ready turns 200
    compile_artifacts: str | None = None  # a bundle from `precompile`; None: look in the compile cache directory
    api_key: str | None = field(default=None, repr=False)  # Bearer token required on all but /health and /ready
    cors_origins: tuple[str, ...] = ()
    host: str = "127.0.0.1"  # where the server listens (decides the default benchmark policy)
    # May a client start a benchmark (minutes of GPU time)? auto: only on a loopback address or
    # behind an API key, where whoever calls is the operator.
    benchmark_runs: str = "auto"
    benchmark_stages: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # default and allowed presets of a benchmark run
    benchmark_warmup: int = 1
    benchmark_repeats: int | None = None  # timed edits per row; None: 3 on a GPU, 1 on a CPU (minutes otherwise)
    benchmark_size: int | None = None  # square side; None: the model's default pixel budget
    benchmark_results_dir: str | None = None  # also write CSV/JSON/markdown/PNG there (like the CLI)

    @property
    def drain_s(self) -> float:
        return self.drain_timeout_s if self.drain_timeout_s is not None else self.request_timeout_s + 10.0

    @property
    def listens_on_loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def benchmark_runs_allowed(self) -> bool:
        if self.benchmark_runs == "auto":
            return self.listens_on_loopback or self.api_key is not None
        return self.benchmark_runs == "on"

    def min_side_for(self, snaps_to_kontext_resolutions: bool) -> int:
        if self.min_size is not None:
            return self.min_size
        return 256 if snaps_to_kontext_resolutions else 16

    @staticmethod
    def api_key_from_env(name: str | None) -> str | None:
        """The key from the environment variable `name`; None (auth off) when unset or empty."""
        if not name:
            return None
        return os.environ.get(name) or None
