"""The service as its users meet it, over HTTP: does a plain request wait behind another request's
variant build and first compile (issue 26's head-of-line scenario), and what does the server add to
the engine's time (served / engine) for PNG edits and text-to-image at the preferred resolutions.

    python -m benchmarks.fair_service --model synthetic-full --out DIR                     # a GPU: the issue's setup
    python -m benchmarks.fair_service --model tiny --device cpu --sizes 256x256 --steps 4 \\
        --override '{"compile": true}' --out /tmp/fair-service                           # the machinery on a CPU

It starts `serve` as a user would (default stack, warm-up before /ready), then:

1. Head of line: a plain 1024x1024 edit alone (twice; the second is "one edit's time"), then a
   request with `--override` (default `{"quantization": "none"}`: a variant to build and compile),
   and `--delay` seconds later the plain edit again. Reported: each request's queue, build, engine
   and server times, whether the plain request's queue time stayed under one edit's time, and
   whether its picture equals the one it got alone (the build beside it must not disturb it).
   `--no-background-builds` passes the flag to the server, for the time before this change.
2. Served / engine: `--repeats` edits (PNG, with an input image) and text-to-image requests at each
   size, one at a time: the server's total over its engine total, the output encode's share, and the
   client's wall time.

Writes fair_service.json and fair_service.md into --out.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.scale_out import ENTRY, Server, free_port
from engine.sizes import KONTEXT_RESOLUTIONS


def picture(width: int, height: int, seed: int = 0) -> str:
    """A base64 PNG with structure (a gradient and a disc), the edit's input."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width, y / height, ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2) * 0.8], -1)
    noise = np.random.default_rng(seed).uniform(0, 0.1, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(((pixels + noise).clip(0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def body(width: int, height: int, steps: int | None, seed: int, edit: bool = True, **extra) -> dict:
    request = {"prompt": "make the sky red", "width": width, "height": height, "seed": seed, "output_format": "png", **extra}
    if edit:
        request["image"] = picture(width, height, seed)
    if steps:
        request["steps"] = steps
    return request


def post(client: httpx.Client, request: dict) -> dict:
    started = time.perf_counter()
    answer = client.post("/inference", json=request)
    wall = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.status_code}: {answer.text[:500]}")
    reply = answer.json()
    return {"wall_s": wall, "timings": reply["timings"], "variant": reply["variant"], "image": reply["images"][0]}


def head_of_line(client: httpx.Client, size: tuple[int, int], steps: int | None, override: dict, delay: float) -> dict:
    width, height = size
    plain = body(width, height, steps, seed=11)
    alone = [post(client, plain) for _ in range(2)]  # the first may still record a CUDA graph
    one_edit_s = alone[-1]["timings"]["engine_total_s"]
    with ThreadPoolExecutor(2) as threads:
        building = threads.submit(post, client, {**body(width, height, steps, seed=12), "optimizations": override})
        time.sleep(delay)
        beside = post(client, plain)
        built = building.result()
    plain_t, built_t = beside["timings"], built["timings"]
    return {
        "override": override,
        "delay_s": delay,
        "one_edit_s": round(one_edit_s, 3),
        "plain_alone": _times(alone[-1]),
        "plain_beside_the_build": _times(beside),
        "override_request": {**_times(built), "built_beside_edits": bool(built["variant"].get("built_beside_edits"))},
        "plain_queue_under_one_edit": plain_t["queue_s"] < one_edit_s,
        "plain_same_picture_as_alone": beside["image"] == alone[-1]["image"],
        "plain_slowdown_vs_alone": round(plain_t["server_total_s"] / alone[-1]["timings"]["server_total_s"], 3),
        "override_build_s": round(built_t["variant_build_s"], 3),
    }


def _times(reply: dict) -> dict:
    t = reply["timings"]
    keys = ("queue_s", "variant_build_s", "engine_total_s", "output_encode_s", "server_total_s")
    return {**{key: round(t[key], 4) for key in keys}, "client_wall_s": round(reply["wall_s"], 4)}


def _other_s(timings: dict) -> float:
    accounted = ("queue_s", "input_decode_s", "engine_total_s", "output_encode_s")
    return timings["server_total_s"] - sum(timings[key] for key in accounted)


def served_over_engine(client: httpx.Client, sizes: list[tuple[int, int]], steps: int | None, repeats: int) -> list[dict]:
    rows = []
    for edit in (True, False):
        for width, height in sizes:
            request = body(width, height, steps, seed=3, edit=edit)
            post(client, request)  # untimed: a new shape may record CUDA graphs once
            replies = [post(client, request) for _ in range(repeats)]
            ratio = [reply["timings"]["server_total_s"] / reply["timings"]["engine_total_s"] for reply in replies]
            encode = [reply["timings"]["output_encode_s"] / reply["timings"]["engine_total_s"] for reply in replies]
            rows.append(
                {
                    "kind": "edit" if edit else "text-to-image",
                    "size": f"{width}x{height}",
                    "engine_s": round(statistics.median(reply["timings"]["engine_total_s"] for reply in replies), 4),
                    "server_s": round(statistics.median(reply["timings"]["server_total_s"] for reply in replies), 4),
                    "client_s": round(statistics.median(reply["wall_s"] for reply in replies), 4),
                    "encode_s": round(statistics.median(reply["timings"]["output_encode_s"] for reply in replies), 4),
                    "queue_s": round(statistics.median(reply["timings"]["queue_s"] for reply in replies), 4),
                    "decode_s": round(statistics.median(reply["timings"]["input_decode_s"] for reply in replies), 4),
                    # the server's time that is none of queue, input decode, engine and encode: body, JSON, hand-offs
                    "other_s": round(statistics.median(_other_s(reply["timings"]) for reply in replies), 4),
                    "served_over_engine": round(statistics.median(ratio), 4),
                    "encode_share": round(statistics.median(encode), 4),
                }
            )
    return rows


def markdown(report: dict) -> str:
    hol = report["head_of_line"]
    lines = [
        f"# Fair service: {report['model']} on {report['device']}, {report['date']}",
        "",
        f"Server: `{' '.join(report['server_args'])}`",
        "",
        f"## Head of line (override {json.dumps(hol['override'])}, sent {hol['delay_s']} s before the plain edit)",
        "",
        "| request | queue s | variant build s | engine s | encode s | server s | client s |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = (("plain, alone", "plain_alone"), ("override", "override_request"), ("plain, beside the build", "plain_beside_the_build"))
    for label, key in rows:
        t = hol[key]
        lines.append(
            f"| {label} | {t['queue_s']} | {t['variant_build_s']} | {t['engine_total_s']} | {t['output_encode_s']} | "
            f"{t['server_total_s']} | {t['client_wall_s']} |"
        )
    lines += [
        "",
        f"One edit: {hol['one_edit_s']} s. Plain request's queue time under one edit: **{hol['plain_queue_under_one_edit']}**; "
        f"its picture the same as alone: **{hol['plain_same_picture_as_alone']}**; its server time "
        f"{hol['plain_slowdown_vs_alone']}x the time alone; the override was built beside the edits: "
        f"{hol['override_request']['built_beside_edits']}.",
        "",
        "## Served / engine (PNG, one request at a time, medians)",
        "",
        f"Shapes at the start of this part: {report['warmup_at_served_start']}.",
        "",
        "| kind | size | engine s | queue s | input decode s | other s | server s | client s | encode s | served / engine "
        "| encode / engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["served"]:
        lines.append(
            f"| {row['kind']} | {row['size']} | {row['engine_s']} | {row['queue_s']} | {row.get('decode_s', '-')} | "
            f"{row.get('other_s', '-')} | {row['server_s']} | {row['client_s']} | {row['encode_s']} | {row['served_over_engine']} | "
            f"{row['encode_share']} |"
        )
    worst = max(row["served_over_engine"] for row in report["served"])
    lines += ["", f"Worst served / engine: **{worst}** (target: at most 1.03)."]
    return "\n".join(lines) + "\n"


def _sizes(text: str, model: str) -> list[tuple[int, int]]:
    if text == "preferred":
        return list(KONTEXT_RESOLUTIONS) if model != "tiny" else [(256, 256)]
    return [tuple(int(side) for side in size.lower().split("x")) for size in text.split(",") if size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-full")
    parser.add_argument("--device", default=None, help="cpu for the CPU check (default: the server's default device)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--override", default='{"quantization": "none"}', help="the optimizations object of the request that builds")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds between the building request and the plain one")
    parser.add_argument("--hol-size", default="1024x1024", help="the head-of-line requests' size (tiny: 256x256)")
    parser.add_argument("--sizes", default="preferred", help="served/engine sizes: preferred (Kontext's 17) or WxH,WxH")
    parser.add_argument("--steps", type=int, default=None, help="steps per request (default: the preset's scheduler default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per size and kind")
    parser.add_argument("--no-background-builds", action="store_true", help="pass it to the server: builds in turn with edits")
    parser.add_argument("--server-arg", action="append", default=[], help="one more argument for serve (repeatable)")
    args = parser.parse_args(argv)

    port = free_port()
    server_args = ["--model", args.model, "--port", str(port), *(["--device", args.device] if args.device else [])]
    server_args += ["--no-background-builds"] if args.no_background_builds else []
    server_args += args.server_arg
    server = Server("fair-service", [sys.executable, ENTRY, "serve", *server_args], port, {})
    report: dict = {"model": args.model, "server_args": server_args, "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    try:
        report["ready_after_s"] = round(server.wait_ready(), 1)
        with httpx.Client(base_url=server.url, timeout=3600) as client:
            health = client.get("/health").json()
            report["device"] = (health["environment"].get("gpu") or {}).get("name") or health["device"]
            report["stack"] = health["default_optimizations"]
            size = _sizes(args.hol_size, args.model)[0]
            report["head_of_line"] = head_of_line(client, size, args.steps, json.loads(args.override), args.delay)
            # shapes still to warm (after --warm-after-idle-s of quiet): the client's back-to-back requests must not wait for them
            warmup = client.get("/health").json()["warmup"]
            report["warmup_at_served_start"] = {key: len(value) for key, value in warmup.items() if isinstance(value, list)}
            report["served"] = served_over_engine(client, _sizes(args.sizes, args.model), args.steps, args.repeats)
            report["queue_metrics"] = [line for line in client.get("/metrics").text.splitlines() if "queue_wait" in line]
    finally:
        server.stop()
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(server.log_path, args.out / "server.log")  # why a build or a request failed, when one did
    (args.out / "fair_service.json").write_text(json.dumps(report, indent=2))
    (args.out / "fair_service.md").write_text(markdown(report))
    print(markdown(report))
    print(f"server log: {args.out / 'server.log'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
