"""Scale-out on one machine, through the real server: throughput with 1 vs N worker processes
(`serve --gpus`), and the latency of one request with Ulysses context parallelism over N GPUs
(`torchrun ... serve --context-parallel N`) vs 1 GPU.

    python -m benchmarks.scale_out --gpus 4                       # GPU machine: 1 vs 4 GPUs
    python -m benchmarks.scale_out --cpu --processes 2            # any machine: tiny model, 2 CPU processes

Each configuration is a server started as a user would start it, warmed with untimed requests (the
first ones compile), then timed from the client: throughput sends `--requests` edits with 2 per
worker in flight, latency sends `--repeats` edits one at a time. The server's own engine time
(`timings.engine_total_s`) is reported beside the client's. Results go to
benchmarks/results/scale-out/<machine>-<N>gpu.{md,json,png} (`-<N>proc` on the CPU).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENTRY = str(ROOT / "flux_kontext_optimized.py")
START_TIMEOUT_S = 3600.0  # a cold compile of the full model at several shapes takes many minutes


class Server:
    """One server configuration as a subprocess; its log in a temporary file."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str]):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log_path = Path(tempfile.mkstemp(prefix=f"scale-out-{name}-", suffix=".log")[1])
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})

    def wait_ready(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(180)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_body(size: int, steps: int | None, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.uniform(0, 255, (size, size, 3)).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    body = {
        "prompt": "make the sky red",
        "image": base64.b64encode(buffer.getvalue()).decode(),
        "width": size,
        "height": size,
        "seed": seed,
    }
    if steps:
        body["steps"] = steps
    return body


def post(client: httpx.Client, body: dict) -> tuple[float, float]:
    started = time.perf_counter()
    answer = client.post("/inference", json=body)
    elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.status_code}: {answer.text[:500]}")
    return elapsed, answer.json()["timings"]["engine_total_s"]


def throughput(server: Server, workers: int, body: dict, requests: int, warmup: int) -> dict:
    in_flight = 2 * workers  # every worker busy, one more waiting for each
    with httpx.Client(base_url=server.url, timeout=3600) as client, ThreadPoolExecutor(in_flight) as threads:
        list(threads.map(lambda _: post(client, body), range(warmup * workers)))  # each worker compiles and warms
        started = time.perf_counter()
        timings = list(threads.map(lambda _: post(client, body), range(requests)))
        wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in timings)
    return {
        "workers": workers,
        "requests": requests,
        "in_flight": in_flight,
        "wall_s": round(wall, 3),
        "edits_per_s": round(requests / wall, 4),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 3),
        "engine_median_s": round(statistics.median(engine for _, engine in timings), 3),
    }


def latency(server: Server, ranks: int, body: dict, repeats: int, warmup: int) -> dict:
    with httpx.Client(base_url=server.url, timeout=3600) as client:
        for _ in range(warmup):
            post(client, body)
        timings = [post(client, body) for _ in range(repeats)]
    return {
        "ranks": ranks,
        "repeats": repeats,
        "client_median_s": round(statistics.median(latency for latency, _ in timings), 3),
        "engine_median_s": round(statistics.median(engine for _, engine in timings), 3),
        "engine_min_s": round(min(engine for _, engine in timings), 3),
    }


def machine_name(cpu: bool) -> str:
    if cpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0).lower().replace(" ", "-")


def run(args: argparse.Namespace) -> dict:
    count = args.processes if args.cpu else args.gpus
    common = ["--model", args.model, "--no-warmup", *args.serve_args.split()]
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))} if args.cpu else {}
    device = ["--device", "cpu"] if args.cpu else []
    body = request_body(args.size, args.steps, seed=0)
    results: dict = {"machine": machine_name(args.cpu), "count": count, "model": args.model, "size": args.size, "steps": args.steps}

    def measured(name: str, command: list[str], measure) -> dict:
        port = free_port()
        server = Server(name, [*command, "--port", str(port)], port, env)
        try:
            ready_s = server.wait_ready()
            row = measure(server)
            row["ready_s"] = round(ready_s, 1)
            print(f"{name}: {json.dumps(row)}", flush=True)
            return row
        finally:
            server.stop()

    serve = [sys.executable, ENTRY, "serve", *common, "--queue-size", str(max(16, 4 * count))]
    ids = ",".join(str(index) for index in range(count))
    if "throughput" in args.parts:
        results["throughput"] = [
            measured(
                f"pool-{n}",
                [*serve, *device, "--gpus", ",".join(ids.split(",")[:n])],
                lambda s, n=n: throughput(s, n, body, args.requests * n, args.warmup),
            )
            for n in (1, count)
        ]
    if "latency" in args.parts:
        single = [*serve, "--device", "cpu" if args.cpu else "cuda:0"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={count}", f"--master_port={free_port()}"]
        parallel = [*torchrun, ENTRY, "serve", *common, *device, "--context-parallel", str(count)]
        results["latency"] = [
            measured("single", single, lambda s: latency(s, 1, body, args.repeats, args.warmup)),
            measured(f"ulysses-{count}", parallel, lambda s: latency(s, count, body, args.repeats, args.warmup)),
        ]
    return results


def markdown(results: dict) -> str:
    unit = "processes" if results["machine"] == "cpu" else "GPUs"
    lines = [f"# Scale-out: {results['machine']}, {results['count']} {unit}", ""]
    lines.append(f"Model `{results['model']}`, {results['size']}x{results['size']} edits, steps {results['steps'] or 'default'}.")
    if results["machine"] == "cpu":
        lines.append("CPU processes stand in for GPUs: this checks the machinery; on a shared CPU the numbers mean little.")
    if "throughput" in results:
        one = results["throughput"][0]["edits_per_s"]
        lines += ["", "| workers | edits/s | x vs 1 | p50 s | p90 s | engine s | ready s |", "|---|---|---|---|---|---|---|"]
        for row in results["throughput"]:
            lines.append(
                f"| {row['workers']} | {row['edits_per_s']:.3f} | {row['edits_per_s'] / one:.2f} | {row['latency_p50_s']} | "
                f"{row['latency_p90_s']} | {row['engine_median_s']} | {row['ready_s']} |"
            )
    if "latency" in results:
        one = results["latency"][0]["engine_median_s"]
        lines += ["", "| ranks (Ulysses) | engine median s | x vs 1 | client median s | ready s |", "|---|---|---|---|---|"]
        for row in results["latency"]:
            speedup = one / row["engine_median_s"]
            lines.append(f"| {row['ranks']} | {row['engine_median_s']} | {speedup:.2f} | {row['client_median_s']} | {row['ready_s']} |")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [part for part in ("throughput", "latency") if part in results]
    figure, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.5), squeeze=False)
    for axis, part in zip(axes[0], parts):
        rows = results[part]
        if part == "throughput":
            axis.bar([str(row["workers"]) for row in rows], [row["edits_per_s"] for row in rows])
            axis.set(title="throughput (serve --gpus)", xlabel="worker processes", ylabel="edits / s")
        else:
            axis.bar([str(row["ranks"]) for row in rows], [row["engine_median_s"] for row in rows])
            axis.set(title="one edit (Ulysses)", xlabel="ranks", ylabel="engine s (median)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gpus", type=int, default=None, help="N: compare 1 with N GPUs (default: every GPU torch sees)")
    parser.add_argument("--cpu", action="store_true", help="CPU processes instead of GPUs (the tiny model; a check of the machinery)")
    parser.add_argument("--processes", type=int, default=2, help="with --cpu: compare 1 with this many processes")
    parser.add_argument("--model", default=None, help="default: synthetic-full on GPUs, tiny with --cpu")
    parser.add_argument("--size", type=int, default=None, help="square edit side (default 1024 on GPUs, 256 with --cpu)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the server's scheduler default)")
    parser.add_argument("--requests", type=int, default=8, help="timed edits per worker in the throughput runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed edits in each latency run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed edits first (per worker for throughput)")
    parser.add_argument("--parts", default="throughput,latency", help="which measurements")
    parser.add_argument("--serve-args", default="", help="more `serve` flags for every server, e.g. '--preset 3'")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results" / "scale-out")
    args = parser.parse_args(argv)
    if not args.cpu and args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
        if args.gpus < 1:
            parser.error("no CUDA GPU here: use --cpu")
    args.model = args.model or ("tiny" if args.cpu else "synthetic-full")
    args.size = args.size or (256 if args.cpu else 1024)
    args.parts = tuple(part.strip() for part in args.parts.split(","))
    results = run(args)
    count = f"{results['count']}{'proc' if args.cpu else 'gpu'}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"{results['machine']}-{count}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    chart(results, stem.with_suffix(".png"))
    print(markdown(results))
    print(f"results written to {stem}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
