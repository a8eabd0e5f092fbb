"""The HTTP API over real HTTP: a `serve --model tiny` subprocess on port 8000 (where the README's
curl commands point; another free port, substituted into the commands, when 8000 is taken or
$FLUX_KONTEXT_TEST_PORT says so)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from stages import registry
from tests.service_server import ROOT, api_server

pytestmark = pytest.mark.slow

README_INFERENCE = (
    'curl -X POST http://localhost:8000/inference -H "Content-Type: application/json" '
    '-d \'{"prompt": "A majestic mountain landscape at sunset", "width": 1024, "height": 1024, "steps": 14, "num_images": 1, '
    '"use_flash_attention": true, "use_mxfp4": true, "use_dpm_solver": true, "use_cuda_graphs": true}\' | jq \'del(.images)\''
)
README_BENCHMARK = "curl http://localhost:8000/benchmark"
README_HEALTH = "curl http://localhost:8000/health"
README_TRY_IT = (
    "curl http://localhost:8000/health | jq '{status, model: .model.name, device}'",
    '.venv/bin/python flux_kontext_optimized.py edit --prompt "a mountain at sunset" --width 256 --height 256 --seed 1 --out in.png',
    'curl -s -X POST http://localhost:8000/inference -H "Accept: image/png" '
    '-F image=@in.png -F prompt="make the sky red" -F seed=0 -o out.png',
)
README_OPENAI_EDIT = (
    'curl -s -X POST http://localhost:8000/v1/images/edits -F image=@in.png -F prompt="make the sky red" -F size=256x256 '
    "-F response_format=b64_json | jq -r '.data[0].b64_json' | base64 -d > out.png"
)
README_JSON_EDIT = (
    'base64 -w0 in.png | jq -Rs \'{prompt: "make the sky red", image: ., seed: 0, optimizations: {compile: false, fuse_qkv: true, '
    'first_block_cache: true, cache_threshold: 0.12, attention: "fa3", quantization: "auto", scheduler: "dpmpp_2m_karras"}}\' \\\n'
    '  | curl -s -X POST http://localhost:8000/inference -H "Content-Type: application/json" -d @- \\\n'
    "  | jq '{seed, width, height, timings, active_stages, skipped_stages, quantization, model, extras, warnings}'"
)
README_TEXT = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SMALL = {"prompt": "make the sky red", "width": 64, "height": 64, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def server(pytestconfig):
    return api_server(pytestconfig)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def run_literal(command: str, port: int, timeout: float = 240, cwd: Path | None = None) -> str:
    """Run a README command as written; only the port changes (when 8000 was taken) and the project's
    interpreter is named by its full path (the command may run in a scratch directory)."""
    if port != 8000:
        command = command.replace("localhost:8000", f"localhost:{port}")
    command = command.replace(".venv/bin/python flux_kontext_optimized.py", f"{sys.executable} {ROOT / 'flux_kontext_optimized.py'}")
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def wait_benchmark_idle(client: httpx.Client, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health").json()["benchmark"]["running"] is not None:
        assert time.monotonic() < deadline, "benchmark still running"
        time.sleep(0.5)


# -- the README's commands, verbatim --------------------------------------------------------------
def test_the_commands_tested_here_are_the_readmes():
    for command in (README_INFERENCE, README_BENCHMARK, README_HEALTH, README_OPENAI_EDIT, README_JSON_EDIT, *README_TRY_IT):
        assert command in README_TEXT, command


def test_readme_try_it_commands_work_as_written(server, tmp_path):
    health = json.loads(run_literal(README_TRY_IT[0], server.port))
    assert health == {"status": "ready", "model": "tiny", "device": "cpu"}
    run_literal(README_TRY_IT[1], server.port, cwd=tmp_path)
    with Image.open(tmp_path / "in.png") as made:
        assert made.size == (256, 256)
    run_literal(README_TRY_IT[2], server.port, cwd=tmp_path)
    with Image.open(tmp_path / "out.png") as edited:
        assert edited.format == "PNG" and edited.size == (256, 256)
    # The JSON edit with per-stage overrides, on the picture the second command made.
    body = json.loads(run_literal(README_JSON_EDIT, server.port, cwd=tmp_path))
    assert (body["seed"], body["width"], body["height"]) == (0, 256, 256), body
    assert {"fuse_qkv", "first_block_cache", "scheduler"} <= set(body["active_stages"]), body["active_stages"]
    assert set(body["skipped_stages"]) == {"attention", "quantization"}, body["skipped_stages"]


def test_readme_inference_curl_succeeds_and_reports_skipped_gpu_stages(server):
    body = json.loads(run_literal(README_INFERENCE, server.port))
    assert "error" not in body and "images" not in body, body  # jq dropped the 3 MB of base64
    assert (body["width"], body["height"], body["steps"]) == (1024, 1024, 14)
    assert isinstance(body["seed"], int)
    requested = body["requested_optimizations"]
    assert requested["attention"] == "fa3" and requested["quantization"] == "auto" and requested["cuda_graphs"] is True
    assert requested["scheduler"] != "euler"
    for stage in ("attention", "quantization", "cuda_graphs"):  # no GPU here: skipped, with the reason
        assert "CUDA" in body["skipped_stages"][stage]
    assert body["quantization"] is None  # no low-precision format ran
    assert body["model"]["random_weights"] is True and "RANDOM" in body["model"]["warning"]
    timings = body["timings"]
    assert len(timings["step_s"]) == 14 and timings["denoise_s"] > 0 and timings["server_total_s"] >= timings["engine_total_s"]


def test_readme_health_curl(server):
    body = json.loads(run_literal(README_HEALTH, server.port))
    assert body["status"] == "ready" and body["version"]
    assert body["model"]["name"] == "tiny" and body["model"]["random_weights"] is True
    assert [row["name"] for row in body["stages"]] == list(registry.STAGE_NAMES)
    assert all({"available", "active", "reason"} <= set(row) for row in body["stages"])
    assert {"waiting", "running", "capacity"} <= set(body["queue"])
    assert body["device"] == "cpu" and "memory" in body


def test_readme_benchmark_curl_starts_the_default_run_on_a_local_server(server, client):
    """The design card's GET works on a loopback server: the first one starts the default run."""
    body = json.loads(run_literal(README_BENCHMARK, server.port, timeout=60))
    assert body["status"] in ("queued", "running"), body
    assert body["progress"]["stages"] == [0, 1, 2, 3, 4, 5] and 0.0 <= body["progress"]["fraction"] <= 1.0
    # The full run compiles (minutes on this CPU); the table itself is tested with POST ?stages=0.
    assert client.delete("/benchmark").json()["status"] in ("cancelled", "cancelling")
    wait_benchmark_idle(client)
    assert client.get("/health").json()["benchmark"]["last_failure"]["status"] == "cancelled"
    assert client.get("/benchmark").json()["status"] == "not_run"  # a later GET starts nothing


# -- /ready, /inference ---------------------------------------------------------------------------
def test_ready(client):
    response = client.get("/ready")
    assert response.status_code == 200 and response.json() == {"ready": True, "status": "ready", "error": None}


def test_json_edit_with_a_data_url_follows_the_input_aspect_ratio(client, photo):
    data_url = "data:image/png;base64," + base64.b64encode(png(photo)).decode()
    response = client.post(
        "/inference", json={"prompt": "make the sky red", "image": data_url, "steps": 2, "seed": 5, "output_format": "jpeg"}
    )
    body = response.json()
    assert response.status_code == 200, body
    image = decode(body["images"][0])
    assert image.format == "JPEG" and body["media_type"] == "image/jpeg"
    assert body["width"] > body["height"]  # 240x180 input: a landscape Kontext resolution
    assert body["timings"]["input_decode_s"] > 0 and body["timings"]["vae_encode_s"] > 0
    assert response.headers["X-Seed"] == "5" and "denoise;dur=" in response.headers["Server-Timing"]


def test_same_seed_gives_the_same_image_and_num_images_gives_several(client):
    first = client.post("/inference", json=SMALL).json()
    again = client.post("/inference", json=SMALL).json()
    several = client.post("/inference", json={**SMALL, "num_images": 2, "output_format": "webp"}).json()
    assert first["images"] == again["images"] and first["seed"] == again["seed"] == 3
    assert len(several["images"]) == 2 and decode(several["images"][1]).format == "WEBP"


def test_structured_optimizations_override_flags_and_cover_every_stage(client):
    optimizations = {
        "compile": False,
        "fuse_qkv": True,
        "channels_last": True,
        "first_block_cache": True,
        "cache_threshold": 0.2,
        "attention": "sdpa",
        "quantization": "fp8",
        "scheduler": "dpmpp_2m_karras",
        "cuda_graphs": True,
    }
    response = client.post("/inference", json={**SMALL, "use_flash_attention": True, "optimizations": optimizations})
    body = response.json()
    assert response.status_code == 200, body
    assert body["requested_optimizations"]["attention"] == "sdpa"  # the object wins over the flat flag
    assert body["requested_optimizations"]["cache_threshold"] == 0.2
    assert {"fuse_qkv", "channels_last"} <= set(body["active_stages"])
    assert set(body["skipped_stages"]) >= {"quantization", "cuda_graphs"}
    assert {row["name"] for row in body["stages"]} == set(registry.STAGE_NAMES)


def test_multipart_upload(client, photo):
    files = {"image": ("photo.png", png(photo), "image/png")}
    data = {
        "prompt": "make the sky red",
        "steps": "2",
        "seed": "9",
        "use_dpm_solver": "true",
        "optimizations": json.dumps({"cache_threshold": 0.3}),
    }
    response = client.post("/inference", files=files, data=data)
    body = response.json()
    assert response.status_code == 200, body
    assert body["seed"] == 9 and body["requested_optimizations"]["cache_threshold"] == 0.3 and body["width"] > body["height"]


def test_raw_image_when_accept_asks_for_one(client):
    response = client.post("/inference", json=SMALL, headers={"Accept": "image/*"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    assert response.headers["X-Seed"] == "3" and response.headers["X-Model-Random-Weights"] == "true"
    jpeg = client.post("/inference", json=SMALL, headers={"Accept": "image/jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    several = client.post("/inference", json={**SMALL, "num_images": 2}, headers={"Accept": "image/png"})
    assert several.status_code == 406 and several.json()["error"]["field"] == "num_images"


# -- OpenAI-compatible ----------------------------------------------------------------------------
def test_openai_client_edit_and_generate(server, photo):
    client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", timeout=120, max_retries=0)
    edited = client.images.edit(
        image=("photo.png", png(photo), "image/png"),
        prompt="make the sky red",
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 2},
    )
    assert edited.data and decode(edited.data[0].b64_json).size == (64, 64) and edited.size == "64x64"
    generated = client.images.generate(prompt="a mountain at sunset", n=2, size="48x32", extra_body={"steps": 1})
    assert len(generated.data) == 2 and decode(generated.data[1].b64_json).size == (48, 32) and generated.output_format == "png"
    with pytest.raises(Exception) as refused:
        client.images.generate(prompt="x", size="64x64", response_format="url")
    assert getattr(refused.value, "status_code", None) == 422 and "b64_json" in str(refused.value)


# -- /metrics, /benchmark, errors -----------------------------------------------------------------
def test_metrics_in_prometheus_format(client):
    client.post("/inference", json=SMALL)
    text = client.get("/metrics").text
    for name in (
        'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="ok"}',
        "kontext_http_request_duration_seconds_bucket",
        "kontext_queue_wait_seconds_bucket",
        "kontext_jobs_running ",
        "kontext_jobs_waiting ",
        "kontext_ready 1.0",
    ):
        assert name in text, name


def test_first_block_cache_counts_reach_the_response_and_metrics(client):
    body = {**SMALL, "steps": 4, "optimizations": {"first_block_cache": True, "cache_threshold": 10.0}}
    answer = client.post("/inference", json=body).json()
    assert answer["extras"]["first_block_cache"]["computed"] == 1 and answer["extras"]["first_block_cache"]["skipped"] == 3
    text = client.get("/metrics").text
    assert 'kontext_first_block_cache_calls_total{outcome="skipped"}' in text


def test_benchmark_runs_are_started_by_post_and_read_by_get(client):
    wait_benchmark_idle(client)
    started = client.post("/benchmark", params={"stages": "0"})
    assert started.status_code == 202, started.text
    assert client.post("/benchmark", params={"stages": "0"}).status_code == 409  # one run at a time
    deadline = time.monotonic() + 240
    while (response := client.get("/benchmark")).status_code == 202:
        assert 0.0 <= response.json()["progress"]["fraction"] <= 1.0
        assert time.monotonic() < deadline
        time.sleep(0.5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "done" and body["stages"] == [0]
    row = body["report"]["rows"][0]
    for column in ("text_encode_s", "denoise_s", "vae_decode_s", "total_s", "speedup_vs_stage0", "peak_memory_gb", "deviation_rel_l2"):
        assert column in row
    assert row["stage"] == 0 and row["total_s"] > 0 and row["speedup_vs_stage0"] == 1.0
    markdown = client.get("/benchmark", params={"format": "md"})
    assert markdown.headers["content-type"].startswith("text/markdown") and "| stage |" in markdown.text
    assert "| stage |" in client.get("/benchmark", headers={"Accept": "text/markdown"}).text
    # Reading never starts work: the old ways of forcing a run through GET do nothing.
    for params in ({"stages": "0,1"}, {"force": "true"}):
        again = client.get("/benchmark", params=params)
        assert again.status_code == 200 and client.get("/health").json()["benchmark"]["running"] is None
    restarted = client.post("/benchmark", params={"stages": "0"})
    assert restarted.status_code == 202 and restarted.json()["latest"]["stages"] == [0]
    assert client.delete("/benchmark").status_code == 200
    wait_benchmark_idle(client)
    assert client.delete("/benchmark").status_code == 404
    assert client.post("/benchmark", params={"stages": "7"}).status_code == 422


def test_unknown_endpoint_and_method_answer_json_errors(client):
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    wrong = client.get("/inference")
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "method_not_allowed"
    assert client.get("/openapi.json").json()["paths"]["/inference"]["post"]["requestBody"]["content"].keys() >= {
        "application/json",
        "multipart/form-data",
    }
