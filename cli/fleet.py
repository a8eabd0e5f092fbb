"""`fleet`: the same HTTP service as a Ray Serve application, one replica per GPU, on a local Ray
instance or an existing Ray cluster (`--ray-address`).

    python flux_kontext_optimized.py fleet --replicas 2                   # fixed size
    python flux_kontext_optimized.py fleet --min-replicas 1 --max-replicas 8   # autoscaled on queue depth

Each replica is the whole app of `serve` (create_app: the routes, limits, queue, errors and
metrics), built inside the replica: the app holds threads and locks and cannot be pickled to it.
A replica takes traffic only once its model is loaded and warmed (`__serve_build_asgi_app__` waits
for it), and Ray replaces one whose model failed to load (`check_health`). Ray autoscales on
ongoing requests per replica, which here is the replica's queue depth (running + waiting edits):
`--target-queue-depth`. Overload is still the app's own 429 + Retry-After: Ray lets each replica
hold a few more requests than its queue (`max_ongoing_requests`), so that /health and /metrics
never wait behind edits at Ray's router.

The compile-artifact bundle of `precompile` (`--compile-artifacts`) is read once by this process
and shipped to every replica through Ray's object store, so replicas on other nodes get it too;
each writes it into its own compile cache directory and loads it before its warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger("flux_kontext.fleet")

ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "kontext"
HEADROOM_REQUESTS = 8  # per replica, beyond its queue: cheap requests (/health, /metrics) never wait at Ray's router


class KontextReplica:
    """One replica: the service of `serve`, on the GPU Ray gave it (CUDA_VISIBLE_DEVICES). It receives
    the declared settings (service, engine), the same objects `serve` builds from its flags."""

    def __init__(self, settings, options, bundle: list | None = None):
        self.settings, self.options = settings, options
        self.bundle_path = self._receive_bundle(bundle) if bundle else None
        self.kontext_app = None

    def _receive_bundle(self, bundle: list) -> str:
        import ray

        from engine.compile_cache import configure_compile_cache

        name, data = ray.get(bundle[0])
        path = configure_compile_cache(self.options.compile_cache) / "bundles" / f"fleet-{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(path)
        return str(path)

    async def __serve_build_asgi_app__(self):
        import dataclasses
        import functools

        from service.app import create_app

        from .engine_loader import load_engine

        settings = self.settings
        if self.bundle_path:
            settings = dataclasses.replace(settings, compile_artifacts=self.bundle_path)
        self.kontext_app = create_app(settings=settings, loader=functools.partial(load_engine, self.options))
        service = self.kontext_app.state.service
        service_health, replica = service.health, _replica_identity()
        service.health = lambda: {**service_health(), "replica": replica}  # which replica answered
        service.start()  # idempotent: the app's lifespan calls it again
        while service.phase not in ("ready", "failed"):  # no traffic before the model is loaded and warm
            await asyncio.sleep(0.5)
        if service.phase == "failed":
            raise RuntimeError(f"the model could not be loaded: {service.error}")
        return self.kontext_app

    def check_health(self) -> None:
        service = self.kontext_app.state.service if self.kontext_app is not None else None
        if service is not None and service.phase == "failed":
            raise RuntimeError(f"the model failed: {service.error}")


def _replica_identity() -> dict:
    from ray import serve

    context = serve.get_replica_context()
    return {"id": context.replica_id.unique_id, "pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


def build_application(args: argparse.Namespace, settings, options, bundle: list | None, gpus_per_replica: float):
    """The Ray Serve application: the deployment with its replica count or autoscaling policy."""
    from ray import serve

    if args.max_replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": args.min_replicas,
                "initial_replicas": max(args.min_replicas, 1),
                "max_replicas": args.max_replicas,
                "target_ongoing_requests": args.target_queue_depth,
                "upscale_delay_s": args.upscale_delay,
                "downscale_delay_s": args.downscale_delay,
            }
        }
    else:
        scaling = {"num_replicas": args.replicas}
    deployment = serve.deployment(
        serve.ingress()(KontextReplica),
        name="KontextReplica",
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 0},
        max_ongoing_requests=settings.queue_size + 1 + HEADROOM_REQUESTS,
        graceful_shutdown_timeout_s=settings.drain_s,
        health_check_period_s=10,
        **scaling,
    )
    return deployment.bind(settings, options, bundle)


def start_fleet(args: argparse.Namespace) -> str:
    """Start (or join) Ray, run the application; returns the URL it answers on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from .options import engine_options_from_args, service_settings_from_args

    settings = service_settings_from_args(args)

    gpus_per_replica = args.gpus_per_replica
    if gpus_per_replica is None:
        import torch

        gpus_per_replica = 1.0 if torch.cuda.device_count() > 0 else 0.0  # 1 on a CPU machine would wait for a GPU forever
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    runtime_env = {"env_vars": {"PYTHONPATH": python_path, **{k: v for k, v in os.environ.items() if k.startswith("FLUX_KONTEXT_")}}}
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=args.verbose, runtime_env=runtime_env)
    bundle = None
    if settings.compile_artifacts:
        path = Path(settings.compile_artifacts)
        if not path.is_file():
            raise OSError(f"--compile-artifacts {path}: no such file (write one with `precompile`)")
        bundle = [ray.put((path.name, path.read_bytes()))]  # in a list: the replicas fetch it themselves
    serve.start(http_options={"host": settings.host, "port": settings.port})
    application = build_application(args, settings, engine_options_from_args(args), bundle, gpus_per_replica)
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def stop_fleet() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def cmd_fleet(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    url = start_fleet(args)
    print(f"fleet ready on {url} (every replica loaded and warm); SIGTERM or Ctrl-C stops it", flush=True)
    try:
        stop.wait()
    finally:
        log.info("stopping the fleet: replicas drain (at most %.0f s), then Ray shuts down", args.drain_timeout or 0)
        stop_fleet()
    return 0
