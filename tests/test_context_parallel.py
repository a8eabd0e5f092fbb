"""Context parallelism (Ulysses) on the CPU with gloo: the stage's rules and guard in one process,
then real torchrun launches of two ranks: the project's wrapped kernel against one process, and
`serve --context-parallel 2` answering an edit that matches the single-process engine."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.requests import EditRequest
from stages import registry
from stages.config import OptimizationConfig
from stages.context_parallel import check_processors
from tests.service_server import ROOT, free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port"]
WAIT_S = 300.0


def two_ranks() -> list[str]:
    return [*TORCHRUN, str(free_port())]


# -- in one process -----------------------------------------------------------------------------------
def test_without_a_torchrun_launch_it_is_switched_off_with_the_reason(cpu_env):
    resolved = registry.resolve(OptimizationConfig(context_parallel=2), cpu_env)
    assert resolved.effective.context_parallel == 1
    assert "torchrun" in resolved.skipped["context_parallel"]


def test_under_two_ranks_the_first_block_cache_and_cuda_graphs_step_aside(cpu_env):
    env = dataclasses.replace(cpu_env, world_size=2)
    resolved = registry.resolve(OptimizationConfig(context_parallel=2, first_block_cache=True, compile=True, cuda_graphs=True), env)
    assert resolved.effective.context_parallel == 2 and not resolved.effective.first_block_cache
    assert "shard" in resolved.skipped["first_block_cache"]


def test_guard_refuses_a_kernel_that_is_not_wrapped(tiny_engine):
    from engine.variants import clone_sharing_tensors
    from stages.attention_kernels import KERNELS
    from stages.flux_attention_processor import set_attention_kernel

    transformer = clone_sharing_tensors(tiny_engine.loaded.pipe.transformer)
    check_processors(transformer)  # diffusers' own processors: parallel-aware
    set_attention_kernel(transformer, KERNELS["sdpa"])
    with pytest.raises(ValueError, match="not wrapped for Ulysses"):
        check_processors(transformer)


# -- two ranks ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_wrapped_kernel_over_two_ranks_matches_one_process():
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*two_ranks(), str(ROOT / "tests" / "context_parallel_ranks.py")],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["env_world_size"] == 2 and result["ranks_agree"]
    assert result["max_abs_error"] < 1e-5 * max(1.0, result["reference_max"])
    assert result["unwrapped_max_abs_error"] > 1e-3  # without the wrapper it is wrong, silently: what the guard is for
    assert "neither diffusers' own" in result["refused"]


@pytest.fixture(scope="module")
def context_parallel_server():
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="kontext-cp-", suffix=".log")[1])
    command = [*two_ranks(), str(ROOT / "flux_kontext_optimized.py"), "serve", "--context-parallel", "2"]
    command += ["--model", "tiny", "--device", "cpu", "--port", str(port), "--drain-timeout", "20"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the context-parallel server did not start:\n{log_path.read_text(errors='replace')[-5000:]}")
        time.sleep(0.5)
    yield url, process, log_path
    if process.poll() is None:
        process.kill()
        process.wait(30)
    log_path.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_serve_context_parallel_matches_the_single_process_engine(context_parallel_server, tiny_engine):
    url, process, log_path = context_parallel_server
    rng = np.random.default_rng(7)
    picture = Image.fromarray(rng.uniform(0, 255, (256, 256, 3)).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    body = {"prompt": "make the sky red", "image": base64.b64encode(buffer.getvalue()).decode(), "steps": 4, "seed": 11}
    answer = httpx.post(f"{url}/inference", json={**body, "width": 256, "height": 256}, timeout=WAIT_S)
    assert answer.status_code == 200, answer.text[:500]
    payload = answer.json()
    assert "context_parallel" in payload["active_stages"]
    parallel = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))), dtype=np.int16)
    single = tiny_engine.edit(EditRequest(prompt=body["prompt"], image=picture, width=256, height=256, steps=4, seed=11))
    difference = np.abs(parallel - np.asarray(single.images[0], dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # float rounding only: at most one level, rarely

    process.send_signal(signal.SIGTERM)  # rank 0 drains, then releases the other rank
    process.wait(120)
    log = log_path.read_text(errors="replace")
    assert "drained: every accepted request was answered" in log and "could not release" not in log


def test_shapes_whose_tokens_do_not_divide_run_unsplit():
    from types import SimpleNamespace

    from engine.context_parallel import ContextParallelEngine
    from engine.loading import FULL_MAX_AREA
    from engine.model_specs import ModelSpec

    full = SimpleNamespace(loaded=SimpleNamespace(spec=ModelSpec("x", "hub", False, FULL_MAX_AREA, True)))

    def splits(width, height, image_size, degree):
        image = Image.new("RGB", image_size) if image_size else None
        return ContextParallelEngine._splits_evenly(full, EditRequest(prompt="p", image=image, width=width, height=height), degree)

    assert splits(1024, 1024, (1024, 1024), 8)  # 4096 + 4096 image tokens, 512 text tokens
    assert splits(1392, 752, (1392, 752), 2) and not splits(1392, 752, (1392, 752), 4)  # 4089 + 4089
    assert not splits(1392, 752, None, 2)  # text to image: 4089 tokens
    assert not splits(1024, 1024, (1024, 1024), 3)  # 512 text tokens
