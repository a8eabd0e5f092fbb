"""Hostile and clumsy clients over real HTTP (a `serve --model tiny` subprocess): aborted and stalled
uploads, oversized bodies from clients that do not wait for 100-continue, malformed headers, deep
JSON, HEAD probes, the benchmark policy. Each answer is a JSON 4xx naming the problem, nothing is
logged as a crash, and the server keeps serving and shuts down on time."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request

import httpx
import pytest

from tests.service_server import api_server, start_server

pytestmark = pytest.mark.slow

SMALL = {"prompt": "make the sky red", "width": 32, "height": 32, "steps": 1, "seed": 1}
POST_HEAD = b"POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n"
GONE = 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="client_disconnected"}'


@pytest.fixture(scope="module")
def server(pytestconfig):
    return api_server(pytestconfig)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def raw_request(port: int, head: bytes, body: bytes = b"", wait_s: float = 5.0) -> bytes:
    """Send bytes as they are (no client library fixing them up) and read what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def metric(client: httpx.Client, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines() if line.startswith(prefix))


def test_deeply_nested_optimizations_in_a_form_are_a_422(client):
    nested = "[" * 3000 + "]" * 3000
    response = client.post("/inference", files={"prompt": (None, "x"), "optimizations": (None, nested)})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "optimizations" and "nested" in response.json()["error"]["message"]


def test_an_aborted_upload_is_a_disconnect_not_a_server_error(server, client):
    before_errors = metric(client, 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="server_error"}')
    before_gone = metric(client, GONE)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(POST_HEAD % b"100" + b'{"prompt": "ha')
            time.sleep(0.3)
    deadline = time.monotonic() + 10
    while metric(client, GONE) < before_gone + 3:
        assert time.monotonic() < deadline, client.get("/metrics").text
        time.sleep(0.2)
    assert metric(client, 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="server_error"}') == before_errors
    assert "Traceback" not in server.log(tail=10**7) and "ClientDisconnect" not in server.log(tail=10**7)


def test_head_probes_see_the_service(client):
    for path in ("/health", "/ready"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b""


def test_a_compressed_body_is_a_415(client):
    response = client.post("/inference", content=b"\x1f\x8b...", headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert response.status_code == 415 and response.json()["error"]["field"] == "Content-Encoding"


def test_a_non_numeric_content_length_gets_the_json_error_shape(server):
    answer = raw_request(server.port, POST_HEAD % b"ten")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "bad_request"


def test_a_bad_json_body_on_the_openai_route_is_a_json_400(client):
    response = client.post("/v1/images/generations", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json"), response.text
    assert "malformed JSON" in response.json()["error"]["message"]
    wrong_type = client.post("/v1/images/generations", content=b"prompt=x", headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415 and wrong_type.headers["content-type"].startswith("application/json"), wrong_type.text


def test_a_json_body_on_the_openai_edits_route_is_told_to_send_a_form(client):
    # OpenAI's edits route is multipart only; without the check a JSON body read as an empty form was "prompt: required"
    response = client.post("/v1/images/edits", json={"prompt": "make the sky red", "image": "iVBORw0KGgo="})
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["field"] == "Content-Type" and "multipart/form-data" in error["message"]


def test_an_oversized_body_from_a_client_that_does_not_wait_still_gets_the_413(server, client):
    """urllib sends the whole body without waiting for 100-continue: it must read the 413, not a reset."""
    body = b'{"prompt": "x", "image": "' + b"A" * (8 * 2**20) + b'"}'
    before = metric(client, 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="too_large"}')
    request = urllib.request.Request(f"{server.url}/inference", data=body, headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413 and json.loads(refused.value.read())["error"]["type"] == "body_too_large"
    # counted under the route it was sent to, not as "unmatched"
    assert metric(client, 'kontext_http_requests_total{endpoint="/inference",method="POST",outcome="too_large"}') == before + 1


def test_an_empty_image_is_refused_not_turned_into_text_to_image(client):
    response = client.post("/inference", json={**SMALL, "image": ""})
    assert response.status_code == 422 and response.json()["error"]["field"] == "image"
    form = client.post("/inference", data={"prompt": "x", "image": ""})
    assert form.status_code == 422 and form.json()["error"]["field"] == "image"


def test_limit_messages_cite_this_servers_limits(client):
    response = client.post("/inference", json={**SMALL, "width": 100_000, "height": 64})
    message = response.json()["error"]["message"]
    assert response.status_code == 422 and "2048" in message and "4096" not in message
    nan_body = b'{"prompt": "x", "optimizations": {"cache_threshold": NaN}}'
    nan = client.post("/inference", content=nan_body, headers={"Content-Type": "application/json"})
    assert nan.status_code in (400, 422) and "finite" in nan.json()["error"]["message"], nan.text


def test_gpu_stages_a_cpu_cannot_run_are_also_in_the_warnings(client):
    body = client.post("/inference", json={**SMALL, "use_flash_attention": True, "use_cuda_graphs": True}).json()
    assert set(body["skipped_stages"]) >= {"attention", "cuda_graphs"}
    assert any(warning.startswith("attention requested but not run") for warning in body["warnings"])


def test_a_stalled_upload_gets_a_408_and_cannot_hold_the_shutdown():
    server = start_server("stall", ["--body-timeout", "1", "--drain-timeout", "4", "--request-timeout", "30"])
    try:
        started = time.monotonic()
        answer = raw_request(server.port, POST_HEAD % b"1000", b'{"pro', wait_s=10)
        assert answer.startswith(b"HTTP/1.1 408") and b"body-timeout" in answer, answer[:300]
        assert time.monotonic() - started < 5
        # Now many stalled uploads, then SIGTERM: the process is gone within its drain timeout.
        stalled = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(POST_HEAD % b"1000" + b"{")
            stalled.append(sock)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.log()
        assert time.monotonic() - signalled < 4 + 2  # the drain timeout, plus process exit
        for sock in stalled:
            sock.close()
    finally:
        server.stop()


def test_a_server_beyond_loopback_without_a_key_starts_no_benchmark_for_clients():
    server = start_server("policy", ["--benchmark-runs", "off"])
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            read = http.get("/benchmark")
            assert read.status_code == 200 and read.json()["status"] == "not_run"
            refused = http.post("/benchmark")
            assert refused.status_code == 403 and "benchmark-runs" in refused.json()["error"]["message"]
            assert http.get("/health").json()["benchmark"]["running"] is None
    finally:
        server.stop()


def test_the_default_benchmark_policy_follows_the_bind_address_and_the_key():
    from service.settings import ServiceSettings

    assert ServiceSettings(host="127.0.0.1").benchmark_runs_allowed
    assert ServiceSettings(host="localhost").benchmark_runs_allowed
    assert not ServiceSettings(host="0.0.0.0").benchmark_runs_allowed
    assert ServiceSettings(host="0.0.0.0", api_key="k").benchmark_runs_allowed
    assert not ServiceSettings(host="127.0.0.1", benchmark_runs="off").benchmark_runs_allowed
    assert ServiceSettings(request_timeout=30).drain_s == 40  # one documented number: the request timeout + 10 s
