"""Start-up as a user sees it: real `serve` processes, timed from launch to /ready and to every shape
warm, phase by phase, then the first requests at preferred resolutions, then the same with a bundle
that `precompile` made earlier.

    python -m benchmarks.startup --model synthetic-full --out benchmarks/results/<gpu>-<date>

1. cold: `serve` with empty compile caches (a fresh node), until /ready; then first requests.
2. `precompile` into a bundle (reusing the cache the cold server filled: it only re-traces).
3. artifacts: `serve --compile-artifacts BUNDLE` with empty caches again, until /ready; then the
   same first requests.
4. with --aot-compile, the same again with `--no-aot-functions` (the bundle's caches, Dynamo and
   Inductor as before): each first request's picture against the AOT path's, for the same seed.
5. with --then-serve-flags, the same as 3 again with those serve flags added (an A/B on one machine,
   e.g. '--defer-graph-recording'): the first requests, and their pictures against step 3's.

With --cold-via-precompile, step 1 is `precompile` on empty caches instead (the same load and
warm-up code as serve, timed from launch to exit), which saves one full compile on a short GPU lease.

Phases come from the server's /health `startup` (service/startup.py): imports (process start to the
engine's start), the engine's imports (torch, diffusers), model load, bundle load, the first shape
(before /ready), each other shape (warmed after /ready while the server is idle), and the epoch times
of /ready and of the last shape warm, from which launch to /ready and launch to all-warm are taken.
The first requests are sent right after /ready, while the other shapes are still being warmed: each
waits behind one shape's warm-up at most, or compiles and records its own shape if none has yet.
Once every shape is warm, the same requests again give each first request's engine time once warm.

Each first request is an edit (an input at the resolution, no size given: Kontext picks it) and a
text-to-image request at that size, at resolutions other than the default square one; for each, the
slowest step against the median step (a compile or a CUDA-graph recording shows up as a slow step)
and the server's total against the engine's. Writes startup.json and startup.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZE_RESOLUTIONS = ((1392, 752), (832, 1248), (1184, 880))  # preferred Kontext resolutions, not the square default
TINY_RESOLUTIONS = ((128, 96), (96, 128), (160, 64))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `serve` process with its own compile cache, timed from launch."""

    def __init__(self, label: str, model: str, cache: Path, extra: list[str], log_dir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(cache / "triton")}
        command = [sys.executable, str(ROOT / "flux_kontext_optimized.py"), "serve", "--model", model, "--port", str(self.port)]
        command += ["--compile-cache", str(cache), *extra]
        self.log_path = log_dir / f"serve_{label}.log"
        self.launched = time.monotonic()
        self.launched_at = time.time()  # the server's epoch stamps (ready_at, done_at) are read against this
        self.process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> float:
        deadline = self.launched + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return time.monotonic() - self.launched
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not ready after {timeout:.0f} s; see {self.log_path}")

    def wait_all_warm(self, timeout: float) -> dict:
        """/health once the background warm-up has warmed every shape."""
        deadline = self.launched + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}; see {self.log_path}")
            health = httpx.get(f"{self.url}/health", timeout=30).json()
            if (health.get("warmup") or {}).get("done"):
                return health
            time.sleep(0.5)
        raise TimeoutError(f"shapes still pending after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def _png(width: int, height: int) -> str:
    from engine.benchmark.runner import benchmark_input_image

    buffer = io.BytesIO()
    benchmark_input_image(width, height).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def first_requests(server: Server, resolutions, pictures: dict | None = None) -> list[dict]:
    """One edit and one text-to-image request (seed 0) at each resolution; `pictures` gets each
    answer's image (base64), by request."""
    rows, pictures = [], pictures if pictures is not None else {}
    with httpx.Client(base_url=server.url, timeout=600) as client:
        for width, height in resolutions:
            for kind, body in (("edit", {"image": _png(width, height)}), ("text-to-image", {"width": width, "height": height})):
                warmed = f"{width}x{height} {kind}" in (client.get("/health").json().get("warmup") or {}).get("warmed", [])
                started = time.monotonic()
                response = client.post("/inference", json={"prompt": "make the sky red", "seed": 0, **body})
                wall = time.monotonic() - started
                response.raise_for_status()
                answer = response.json()
                timings = answer["timings"]
                steps = timings["step_s"]
                pictures[f"{answer['width']}x{answer['height']} {kind}"] = answer["images"][0]
                rows.append(
                    {
                        "request": f"{answer['width']}x{answer['height']} {kind}",
                        "shape_warm_before": warmed,  # False: it waited for the warm-up or recorded its own shape
                        "steps": len(steps),
                        "median_step_s": round(statistics.median(steps), 4),
                        "slowest_step_s": round(max(steps), 4),
                        "slowest_over_median": round(max(steps) / statistics.median(steps), 2),
                        # each step: at an unrecorded shape, which one warmed Inductor's CUDA graphs and which recorded them
                        "step_s": [round(step, 4) for step in steps],
                        "cuda_graphs": answer["variant"].get("cuda_graphs"),  # recorded, replayed or deferred (engine._graph_use)
                        "engine_s": timings["engine_total_s"],
                        "served_s": timings["server_total_s"],
                        "served_over_engine": round(timings["server_total_s"] / timings["engine_total_s"], 3),
                        "output_encode_s": timings["output_encode_s"],
                        "client_wall_s": round(wall, 3),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def run_server(
    label: str, model: str, cache: Path, extra: list[str], resolutions, out: Path, timeout: float, pictures: dict | None = None
) -> dict:
    server = Server(label, model, cache, extra, out)
    try:
        polled_ready_s = server.wait_ready(timeout)
        print(f"{label}: /ready after {polled_ready_s:.1f} s", flush=True)
        requests = first_requests(server, resolutions, pictures)  # at once: the background warm-up is still going
        startup = server.wait_all_warm(timeout)["startup"]
        # The same requests once every shape is warm: the first requests' engine time against these
        warm = {row["request"]: row for row in first_requests(server, resolutions)}
    finally:
        server.stop()
    for row in requests:
        if row["request"] in warm:
            row["warm_engine_s"] = warm[row["request"]]["engine_s"]
            row["engine_over_warm"] = round(row["engine_s"] / row["warm_engine_s"], 3)
    ready_at, done_at = startup.get("ready_at"), (startup.get("warmup") or {}).get("done_at")
    return {
        "launch_to_ready_s": round(ready_at - server.launched_at if ready_at else polled_ready_s, 1),
        "launch_to_all_warm_s": round(done_at - server.launched_at, 1) if done_at else None,
        "startup": startup,
        "first_requests": requests,
    }


def compare_pictures(aot: dict, jit: dict) -> list[dict]:
    """Per request (seed 0 in both servers): whether the first server's picture (the AOT path's) is
    the second's (the JIT path's, or --then-serve-flags'), bit for bit, and the largest difference of
    a pixel value (0-255) where it is not."""
    import numpy as np
    from PIL import Image

    def pixels(encoded: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")).astype(int)

    rows = []
    for request in sorted(set(aot) & set(jit)):
        same = aot[request] == jit[request]
        worst = 0 if same else int(np.abs(pixels(aot[request]) - pixels(jit[request])).max())
        rows.append({"request": request, "identical": same, "max_pixel_difference": worst})
    return rows


def precompile(model: str, cache: Path, bundle: Path, out: Path, flags: list[str]) -> dict:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(cache / "triton")}
    command = [sys.executable, str(ROOT / "flux_kontext_optimized.py"), "precompile", "--model", model, "--compile-cache", str(cache)]
    command += ["--out", str(bundle), *flags]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    (out / "precompile.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"precompile failed ({done.returncode}); see {out / 'precompile.log'}")
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    return {"seconds": round(time.monotonic() - started, 1), **summary}


PHASES = (  # (row label, path in /health's startup)
    ("imports (process start to engine start), s", ("imports_s",)),
    ("engine imports (torch, diffusers), s", ("engine_imports_s",)),
    ("model load, s", ("load_s",)),
    ("bundle load, s", ("compile_artifacts_s",)),
    ("first shape (build + compile + record), s", ("warmup", "phases", "first_shape_s")),
    ("other shapes, s in all (CUDA-graph recording, after /ready)", ("warmup", "phases", "other_shapes_s")),
    ("compile artifacts", ("compile_artifacts", "reason")),
    ("ahead-of-time functions", ("compile_artifacts", "aot_functions")),
    ("compile cache counters", ("compile_counters",)),
)


def _lookup(run: dict, *path):
    value = run.get("startup", {})
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return value if value not in ({}, None) else "-"


def _other_shapes(run: dict) -> str:
    """The shapes after the first: how many the warm-up ran (min / median / max s) and how many a request ran first."""
    rows = (run.get("startup", {}).get("warmup") or {}).get("shapes", [])[1:]
    warmed = [row["seconds"] for row in rows if row.get("by", "warm-up") == "warm-up" and "error" not in row]
    by_request = sum(1 for row in rows if row.get("by") == "request")
    if not warmed:
        return f"0 warmed, {by_request} by requests"
    spread = f"{min(warmed):.2f} / {statistics.median(warmed):.2f} / {max(warmed):.2f} s"
    return f"{len(warmed)} warmed ({spread}), {by_request} by requests"


def markdown(report: dict) -> str:
    lines = [f"# Start-up ({report['meta']['device']}, {report['meta']['date']}, model {report['model']})", ""]
    if report.get("cold_measured_by"):
        lines += [f"Cold start measured by {report['cold_measured_by']}.", ""]
    lines += ["| phase | cold | with a precompile bundle |", "|---|---|---|"]
    cold, warm = report["cold"], report.get("artifacts", {})
    for label, key in (("launch to /ready, s", "launch_to_ready_s"), ("launch to every shape warm, s", "launch_to_all_warm_s")):
        lines.append(f"| {label} | {cold.get(key) or '-'} | {warm.get(key) or '-'} |")
    lines += [f"| {label} | {_lookup(cold, *path)} | {_lookup(warm, *path)} |" for label, path in PHASES]
    lines.append(f"| shapes after the first: min / median / max | {_other_shapes(cold)} | {_other_shapes(warm) if warm else '-'} |")
    if "precompile" in report:
        lines += ["", f"precompile: {report['precompile']['seconds']} s, bundle {report['precompile']['megabytes']} MB"]
    then = report.get("then", {})
    for label, run in (("cold", cold), ("with artifacts", warm), (f"with artifacts and {then.get('serve_flags')}", then)):
        if not run or not run.get("first_requests"):
            continue
        lines += [
            "",
            f"First requests right after /ready, while the other shapes are warmed ({label}; warm: the shape was warm when sent)",
            "",
            "| request | warm | steps | median step s | slowest step s | slowest / median | engine s | engine once warm s "
            "| engine / once warm | served s | served / engine | encode s | client s |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in run["first_requests"]:
            cells = (
                row["request"],
                ("yes" if row.get("shape_warm_before") else "no") + (f" ({row['cuda_graphs']})" if row.get("cuda_graphs") else ""),
                row["steps"],
                row["median_step_s"],
                row["slowest_step_s"],
                row["slowest_over_median"],
                row["engine_s"],
                row.get("warm_engine_s", "-"),
                row.get("engine_over_warm", "-"),
                row["served_s"],
                row["served_over_engine"],
                row["output_encode_s"],
                row["client_wall_s"],
            )
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    comparisons = (
        ("aot_vs_jit", "AOT functions against the JIT path (the same bundle's caches, `--no-aot-functions`), seed 0"),
        ("then_vs_artifacts", f"With artifacts and {then.get('serve_flags')} against with artifacts, seed 0"),
    )
    for key, title in comparisons:
        if report.get(key):
            lines += ["", title, "", "| request | identical | max pixel difference |", "|---|---|---|"]
            lines += [
                f"| {row['request']} | {'yes' if row['identical'] else 'no'} | {row['max_pixel_difference']} |" for row in report[key]
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-root", type=Path, default=Path("/tmp/kontext-startup"), help="scratch compile caches (emptied first)")
    parser.add_argument("--timeout", type=float, default=1500, help="longest wait for /ready, s")
    parser.add_argument("--skip-artifacts", action="store_true", help="cold start only")
    parser.add_argument("--cold-via-precompile", action="store_true", help="measure the cold start with precompile on empty caches")
    parser.add_argument("--flags", default="", help="extra flags for serve and precompile, e.g. '--compile' for a CPU try-out")
    parser.add_argument(
        "--aot-compile", action="store_true", help="precompile --aot-compile: the bundle's blocks and VAE skip Dynamo (experimental)"
    )
    parser.add_argument("--serve-flags", default="", help="extra flags for serve only, e.g. '--warm-all-before-ready'")
    parser.add_argument("--skip-jit", action="store_true", help="with --aot-compile: no server with --no-aot-functions (step 4)")
    parser.add_argument(
        "--then-serve-flags",
        default="",
        help="after the bundle's server, one more with the bundle and these serve flags too (e.g. '--defer-graph-recording')",
    )
    args = parser.parse_args(argv)
    flags, serve_flags = args.flags.split(), args.serve_flags.split()
    aot = ["--aot-compile"] if args.aot_compile else []
    # SIGTERM ends this script through its `finally` blocks, which stop the servers it started
    # (a server left behind holds its GPU memory, and drains for minutes on its own SIGTERM).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    resolutions = TINY_RESOLUTIONS if args.model == "tiny" else FULL_SIZE_RESOLUTIONS
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.cache_root, ignore_errors=True)
    cold_cache, fresh_cache, bundle = args.cache_root / "cold", args.cache_root / "fresh", args.cache_root / "bundle.zip"
    report = {"model": args.model, "meta": _meta()}
    if args.cold_via_precompile:
        report["precompile"] = precompile(args.model, cold_cache, bundle, args.out, flags + aot)
        seconds = report["precompile"]["seconds"]  # precompile warms every shape before it exits
        report["cold"] = {
            "launch_to_ready_s": seconds,
            "launch_to_all_warm_s": seconds,
            "startup": report["precompile"],
            "first_requests": [],
        }
        report["cold_measured_by"] = "precompile on empty caches (serve's load and warm-up, launch to exit)"
    else:
        report["cold"] = run_server("cold", args.model, cold_cache, [*flags, *serve_flags], resolutions, args.out, args.timeout)
    _write(report, args.out)
    if not args.skip_artifacts:
        if "precompile" not in report:
            report["precompile"] = precompile(args.model, cold_cache, bundle, args.out, flags + aot)
        _write(report, args.out)
        with_bundle = [*flags, *serve_flags, "--compile-artifacts", str(bundle)]
        aot_pictures: dict = {}
        report["artifacts"] = run_server(
            "artifacts", args.model, fresh_cache, with_bundle, resolutions, args.out, args.timeout, aot_pictures
        )
        _write(report, args.out)
        if args.aot_compile and not args.skip_jit:  # the same requests with the bundle's caches only (JIT): the same pictures?
            jit_pictures: dict = {}
            jit_cache = args.cache_root / "fresh-jit"
            run_server(
                "jit", args.model, jit_cache, [*with_bundle, "--no-aot-functions"], resolutions, args.out, args.timeout, jit_pictures
            )
            report["aot_vs_jit"] = compare_pictures(aot_pictures, jit_pictures)
            _write(report, args.out)
        if args.then_serve_flags:
            then_pictures: dict = {}
            then_flags = args.then_serve_flags.split()
            report["then"] = run_server(
                "then",
                args.model,
                args.cache_root / "fresh-then",
                [*with_bundle, *then_flags],
                resolutions,
                args.out,
                args.timeout,
                then_pictures,
            )
            report["then"]["serve_flags"] = args.then_serve_flags
            report["then_vs_artifacts"] = compare_pictures(aot_pictures, then_pictures)
            _write(report, args.out)
    print(markdown(report))
    return 0


def _meta() -> dict:
    import datetime as dt

    import torch

    from stages.environment import package_version

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions = {name: package_version(name) for name in ("torch", "triton", "diffusers", "torchao", "fa3-fwd")}
    return {"device": device, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **versions}


def _write(report: dict, out: Path) -> None:
    (out / "startup.json").write_text(json.dumps(report, indent=2))
    (out / "startup.md").write_text(markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
