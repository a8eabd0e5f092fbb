"""`fleet`: the service as a Ray Serve application, started with its one documented command, on a
local Ray instance with two CPU replicas of the tiny model. The README's curls answer as on
`serve`, errors pass through Ray unchanged, and both replicas get the compile-artifact bundle.

Run alone with `pytest -m ray` (starting Ray and two replicas takes about a minute on 2 cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service_server import ROOT, free_port
from tests.test_service_api import README_HEALTH, README_INFERENCE, README_OPENAI_EDIT, README_TRY_IT, run_literal

pytestmark = [pytest.mark.slow, pytest.mark.ray]
START_TIMEOUT_S = 420.0
README_UPLOAD = README_TRY_IT[2]


def fake_bundle(path: Path) -> Path:
    """A bundle built "for another setup": every replica must receive it and skip it, with the reason."""
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("manifest.json", json.dumps({"key": {"format": 1, "gpu": "another GPU"}, "artifacts_sha256": "-"}))
        bundle.writestr("artifacts.bin", b"not compiled here")
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fleet")
    bundle = fake_bundle(workdir / "kontext-test.zip")
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="kontext-fleet-", suffix=".log")[1])
    command = [sys.executable, str(ROOT / "flux_kontext_optimized.py"), "fleet", "--model", "tiny", "--device", "cpu"]
    command += ["--replicas", "2", "--port", str(port), "--queue-size", "1", "--compile-artifacts", str(bundle)]
    command += ["--compile-cache", str(workdir / "cache")]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # never join another cluster
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**environment, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while "fleet ready" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the fleet did not start:\n{log_path.read_text(errors='replace')[-5000:]}")
        time.sleep(1)
    Image.new("RGB", (96, 64), (200, 120, 40)).save(workdir / "in.png")
    yield url, port, workdir
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
    log_path.unlink(missing_ok=True)


def literal_in(workdir: Path, command: str, port: int) -> str:
    done = subprocess.run(
        command.replace("localhost:8000", f"localhost:{port}"), shell=True, cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_readme_curls_answer_through_ray(fleet):
    url, port, workdir = fleet
    body = json.loads(run_literal(README_INFERENCE, port))
    assert "error" not in body, body
    assert (body["width"], body["height"], body["steps"]) == (1024, 1024, 14) and "images" not in body  # jq dropped them
    assert "CUDA" in body["skipped_stages"]["attention"]
    health = json.loads(run_literal(README_HEALTH, port))
    assert health["status"] == "ready" and health["model"]["name"] == "tiny"
    literal_in(workdir, README_UPLOAD, port)
    width, height = Image.open(workdir / "out.png").size
    assert width > height  # Kontext picks a size of the input's aspect ratio
    (workdir / "out.png").unlink()
    literal_in(workdir, README_OPENAI_EDIT, port)
    assert Image.open(workdir / "out.png").size == (256, 256)


def test_two_replicas_answer_and_each_got_the_bundle(fleet):
    url, _, _ = fleet
    replicas = {}
    deadline = time.monotonic() + 120
    while len(replicas) < 2:  # Ray's router spreads requests over both replicas
        assert time.monotonic() < deadline, f"only saw replicas {list(replicas)}"
        health = httpx.get(f"{url}/health", timeout=30).json()
        replicas[health["replica"]["id"]] = health
    for health in replicas.values():
        artifacts = health["startup"]["compile_artifacts"]
        assert "fleet-kontext-test.zip" in artifacts["path"] and artifacts["reason"].startswith("skipped: built for another setup")
    assert len({health["replica"]["pid"] for health in replicas.values()}) == 2


def test_errors_pass_through_ray_unchanged(fleet):
    url, _, _ = fleet
    invalid = httpx.post(f"{url}/inference", json={"prompt": ""}, timeout=60)
    assert invalid.status_code == 422 and invalid.json()["error"]["field"] == "prompt"
    # --queue-size 1: each replica holds one running and one waiting edit; the rest get the app's own 429.
    slow = {"prompt": "make the sky red", "width": 256, "height": 256, "steps": 28, "seed": 1}
    with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(12) as threads:
        answers = list(threads.map(lambda _: client.post("/inference", json=slow), range(12)))
    codes = [answer.status_code for answer in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 1, codes
    full = next(answer for answer in answers if answer.status_code == 429)
    assert full.json()["error"]["type"] == "queue_full" and int(full.headers["retry-after"]) >= 1
