"""The service's limits and policies: one object, each field declared once with its help (the
command line's flags, /health's limits and the Ray replicas' settings all come from these fields).

Every limit exists to keep one bad or greedy request from hurting the others: the queue bounds
memory and latency, the pixel caps bound GPU memory, the body cap and the body timeout bound what
a client can make the server read and for how long, the request timeout bounds how long a client
waits, the drain timeout bounds how long a shutdown takes.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from typing import Literal

from engine.setting import declared_fields, setting
from stages.config import PRESETS, USER_FIELDS, OptimizationConfig, parse_presets

API_KEY_ENV_DEFAULT = "FLUX_KONTEXT_API_KEY"
LOOPBACK_NAMES = ("localhost",)
SERVER, LOAD, VARIANTS, LIMITS, SECURITY, BENCHMARK = "server", "load and timeouts", "variants", "input limits", "security", "/benchmark"


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _presets(text: str) -> tuple[int, ...]:
    return tuple(parse_presets(text))


def optimization_overrides(text: str) -> dict:
    """A JSON object of optimization knobs, as a request's `optimizations` (--warm-variants)."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{text!r} is not a JSON object ({error.msg})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"{text!r} is not a JSON object of optimization knobs")
    unknown = sorted(set(overrides) - set(USER_FIELDS))
    if unknown:
        raise ValueError(f"unknown optimization knob(s) {', '.join(unknown)}; known: {', '.join(USER_FIELDS)}")
    OptimizationConfig().with_changes(**overrides)  # the values too (a ValueError names the field)
    return overrides


def _overrides_text(text: str) -> str:
    return json.dumps(optimization_overrides(text), sort_keys=True)


@dataclass(frozen=True)
class ServiceSettings:
    # -- where it listens -------------------------------------------------------------------------------
    host: str = setting(
        "127.0.0.1",
        "bind address (0.0.0.0 exposes the service to the network; fleet: where Ray's proxy listens)",
        SERVER,
        env="FLUX_KONTEXT_HOST",
    )
    port: int = setting(8000, "TCP port", SERVER, env="FLUX_KONTEXT_PORT")
    # -- load and timeouts ------------------------------------------------------------------------------
    queue_size: int = setting(16, "requests waiting for the GPU beyond the running one; more get 429 + Retry-After", LOAD, public=True)
    request_timeout: float = setting(120.0, "seconds from arrival to answer, queued time included; beyond: 504", LOAD, public=True)
    # SIGTERM: the process exits at most this many seconds later, whatever its clients do. Accepted
    # work gets that long to finish (by default a request's own timeout plus 10 s of margin).
    drain_timeout: float | None = setting(
        None,
        "on SIGTERM, the most seconds the process waits for accepted work before it exits (the whole shutdown, connections "
        "included; default: --request-timeout + 10)",
        LOAD,
    )
    body_timeout: float = setting(30.0, "seconds a client may take to send its request body; slower uploads get 408", LOAD, public=True)
    warmup: bool = setting(
        True,
        "before /ready turns 200, run the first shape a request can reach (builds and compiles); the others run afterwards, "
        "one at a time while no request waits, on the thread that serves requests (records their CUDA graphs)",
        LOAD,
    )
    # A client that sends its next request as soon as it has the last answer leaves the GPU idle for a
    # few hundred milliseconds: a shape started then would delay that request by a whole warm-up edit
    # (0.5-1.0 s on an H100, 20-35% of an edit: fair_service on 2026-12-06).
    warm_after_idle_s: float = setting(
        1.0, "seconds without a request before the next shape is warmed after /ready (a request arriving sooner never waits for one)", LOAD
    )
    warm_all_before_ready: bool = setting(
        False, "run every shape before /ready instead (no request after /ready compiles or records anything; a later /ready)", LOAD
    )
    # The step that records a shape's CUDA graphs costs 0.35-0.45 s more than a replayed one (H100,
    # 2026-12-06): a request sent before the idle warm-up reached its shape paid it (engine/engine.py).
    defer_graph_recording: bool = setting(
        False,
        "a request at a shape whose CUDA graphs are not recorded yet runs the compiled blocks without them, and the shape "
        "records at the next idle warm-up or its second request (off: that request records them, one step 3-5x slower)",
        LOAD,
    )
    compile_artifacts: str | None = setting(
        None,
        "a bundle written by `precompile` (same GPU model and versions): loaded before the warm-up so that it compiles from cache "
        "(default: the bundle precompile left in the compile cache directory, if any)",
        LOAD,
    )
    aot_functions: bool = setting(
        True,
        "run the ahead-of-time compiled functions a bundle from `precompile --aot-compile` carries (experimental): the blocks "
        "and the VAE skip Dynamo and Inductor at start-up; off: they compile from the bundle's caches as before",
        LOAD,
    )
    per_request_variants: bool = setting(
        True,
        "let requests ask for build-time stages (compile, quantization, attention kernel, ...) other than the server's; "
        "each new combination builds a variant, and compile takes minutes per new shape",
        LOAD,
        public=True,
    )
    # -- variants -----------------------------------------------------------------------------------------
    background_builds: bool = setting(
        True,
        "build the variant a request asks for, and compile it with a short edit, on a thread beside the one serving requests on "
        "built variants, which never wait for it; off: builds run in turn with edits",
        VARIANTS,
        public=True,
    )
    variant_builds_per_hour: int = setting(
        10, "variant builds one client (by address) may cause in an hour; beyond: 429 with Retry-After (0: no limit)", VARIANTS, public=True
    )
    warm_variants: tuple[str, ...] = setting(
        tuple,
        'an optimizations object (JSON, as in a request: \'{"quantization": "none"}\') whose variant is built and warmed as the '
        "default one is: its first shape before /ready (repeatable); each counts against --max-variants",
        VARIANTS,
        repeat=True,
        parse=_overrides_text,
        metavar="JSON",
    )
    # -- input limits -----------------------------------------------------------------------------------
    max_body_mb: float = setting(32.0, "request body cap in MiB, checked while it is read (413 beyond)", LIMITS, public=True)
    max_input_pixels: int = setting(4096 * 4096, "decoded input image cap (width x height)", LIMITS, public=True)
    max_pixels: int = setting(2048 * 2048, "output pixels per request (width x height x images)", LIMITS, public=True)
    min_size: int | None = setting(None, "smallest output side (default: 256 for real models, 16 for tiny)", LIMITS)
    max_size: int = setting(2048, "largest output side", LIMITS)
    max_steps: int = setting(50, "most denoising steps a request may ask for", LIMITS, public=True)
    default_steps: int | None = setting(
        None, "steps when a request gives none (default: the scheduler's: 28 Euler, 14 DPM-Solver++)", LIMITS, public=True
    )
    max_images: int = setting(4, "most images per request", LIMITS, public=True)
    min_input_side: int = 16  # a 1x1 input is not an image to edit (no flag: not worth tuning)
    # -- security ---------------------------------------------------------------------------------------
    api_key_env: str = setting(
        API_KEY_ENV_DEFAULT,
        "environment variable holding the API key; when it is set, every endpoint but /health and /ready needs Authorization: Bearer <key>",
        SECURITY,
    )
    cors_origins: tuple[str, ...] = setting(tuple, "comma-separated origins allowed by CORS; empty: CORS off", SECURITY, parse=_comma_list)
    api_key: str | None = field(default=None, repr=False)  # from $api_key_env (from_options); Bearer token on all but /health and /ready
    # -- /benchmark -------------------------------------------------------------------------------------
    # May a client start a benchmark (minutes of GPU time)? auto: only on a loopback address or
    # behind an API key, where whoever calls is the operator.
    benchmark_runs: Literal["auto", "on", "off"] = setting(
        "auto", "may POST /benchmark start a run? auto: only on a loopback address or with an API key", BENCHMARK
    )
    benchmark_stages: tuple[int, ...] = setting(
        PRESETS, "presets a benchmark runs by default, and the only ones a run may pick (e.g. 0-5 or 0,4)", BENCHMARK, parse=_presets
    )
    benchmark_warmup: int = setting(1, "untimed edits per row", BENCHMARK)
    benchmark_repeats: int | None = setting(None, "timed edits per row (default: 3 on a GPU, 1 on a CPU)", BENCHMARK)
    benchmark_size: int | None = setting(None, "square output side (default: the model's default size)", BENCHMARK)
    benchmark_results_dir: str | None = setting(None, "also write each finished table there (CSV/JSON/markdown/PNG)", BENCHMARK)

    @classmethod
    def from_options(cls, values: dict) -> "ServiceSettings":
        """Settings from the declared fields' values (the command line's), the API key read from the
        variable `api_key_env` names, once, here: the settings then travel whole (worker processes, Ray)."""
        chosen = {field.name: values[field.name] for field in declared_fields(cls) if field.name in values}
        settings = cls(**chosen)
        return cls(**{**chosen, "api_key": os.environ.get(settings.api_key_env) or None})

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def drain_s(self) -> float:
        return self.drain_timeout if self.drain_timeout is not None else self.request_timeout + 10.0

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
