"""Prometheus metrics, in a registry of the app's own (tests build several apps in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)
SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


def outcome_for_status(status: int) -> str:
    if status < 400:
        return "ok"
    return {
        401: "unauthorized",
        408: "body_timeout",
        413: "too_large",
        429: "rejected_queue_full",
        499: "client_disconnected",
        503: "unavailable",
        504: "timeout",
    }.get(status, "client_error" if status < 500 else "server_error")


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kontext_http_requests_total", "HTTP requests by endpoint and outcome", ["endpoint", "method", "outcome"], registry=r
        )
        self.latency = Histogram(
            "kontext_http_request_duration_seconds",
            "End-to-end request time as the server sees it",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "kontext_queue_wait_seconds", "Time a job waited for the GPU worker", ["kind"], buckets=QUEUE_BUCKETS, registry=r
        )
        self.job_duration = Histogram(
            "kontext_job_duration_seconds", "Time a job ran on the GPU worker", ["kind"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.jobs = Counter("kontext_jobs_total", "GPU jobs by kind and outcome", ["kind", "outcome"], registry=r)
        self.images = Counter("kontext_images_generated_total", "Images produced", registry=r)
        self.running = Gauge("kontext_jobs_running", "Jobs running on the GPU worker (0 or 1)", registry=r)
        self.waiting = Gauge("kontext_jobs_waiting", "Jobs waiting in the queue", registry=r)
        self.building = Gauge("kontext_jobs_building", "Jobs waiting for their variant to be built beside the serving thread", registry=r)
        self.ready = Gauge("kontext_ready", "1 when the model is loaded and warm and the server is not draining", registry=r)
        self.cache_calls = Counter(
            "kontext_first_block_cache_calls_total",
            "Transformer calls under the first-block cache: fully computed or skipped (a true-CFG step is two calls)",
            ["outcome"],
            registry=r,
        )
        self.gpu_memory = Gauge("kontext_gpu_memory_bytes", "GPU memory (allocated, reserved, free, total)", ["kind"], registry=r)
        self.lora_edits = Counter("kontext_lora_edits_total", "Edits that ran with LoRA adapters", registry=r)
        self.lora_swap = Histogram(
            "kontext_lora_swap_seconds",
            "Changing adapters: copying them into the LoRA slots, or (merge mode) restoring and merging the weights",
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.lora_loads = Counter(
            "kontext_lora_loads_total", "Adapter loads by outcome (ok, refused; first_use: named by a request)", ["outcome"], registry=r
        )
        self.lora_load_seconds = Histogram(
            "kontext_lora_load_seconds", "Reading, checking and converting an adapter file", buckets=LATENCY_BUCKETS, registry=r
        )
        self.loras_loaded = Gauge("kontext_loras_loaded", "Adapters loaded", registry=r)
        self.lora_memory = Gauge("kontext_lora_memory_bytes", "Device memory held by the loaded adapters", registry=r)
        self.warm_shapes = Gauge(
            "kontext_warmup_shapes",
            "Shapes a request can reach, by warm-up state (warmed, failed, pending: warmed while idle)",
            ["state"],
            registry=r,
        )

    def record_edit(self, result) -> None:
        self.images.inc(len(result.images))
        cache = result.extras.get("first_block_cache")
        if cache:
            self.cache_calls.labels("computed").inc(cache.get("computed", 0))
            self.cache_calls.labels("skipped").inc(cache.get("skipped", 0))
        lora = result.extras.get("lora", {})
        for loaded in lora.get("loaded", ()):  # adapters the request named, loaded on first use
            self.lora_loads.labels("first_use").inc()
            self.lora_load_seconds.observe(loaded["load_s"])
        if lora.get("adapters"):  # in merge mode a request without adapters may report the restore it paid
            self.lora_edits.inc()
        if lora.get("swap_s"):  # in merge mode, a request with the adapters already merged swaps nothing
            self.lora_swap.observe(lora["swap_s"])

    def bind(
        self,
        waiting: Callable[[], float],
        running: Callable[[], float],
        building: Callable[[], float],
        ready: Callable[[], float],
        memory: Callable[[], dict[str, int]],
        loras: Callable[[], tuple[int, int]] = lambda: (0, 0),
        warmup: Callable[[], dict | None] = lambda: None,
    ) -> None:
        """Read live values at scrape time instead of updating gauges from every code path.
        `loras` gives (adapters loaded, their bytes); `warmup` the shapes' warm-up status."""
        for state in ("warmed", "failed", "pending"):
            self.warm_shapes.labels(state).set_function(lambda state=state: _count(warmup(), state))
        self.waiting.set_function(waiting)
        self.running.set_function(running)
        self.building.set_function(building)
        self.ready.set_function(ready)
        self.loras_loaded.set_function(lambda: loras()[0])
        self.lora_memory.set_function(lambda: loras()[1])
        self._memory = memory

    def render(self) -> bytes:
        memory = getattr(self, "_memory", lambda: {})() or {}
        for kind, value in memory.items():
            self.gpu_memory.labels(kind).set(value)
        return generate_latest(self.registry)


def _count(status: dict | None, state: str) -> int:
    """Shapes in `state`; the one being warmed counts as pending."""
    if not status:
        return 0
    return len(status.get(state, ())) + (state == "pending" and status.get("warming") is not None)
