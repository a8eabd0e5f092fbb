"""/health answers with the loaded model and every stage's status; /ready is 503 until the model is
loaded and warmed (in process; the real-server tests check the same over HTTP)."""

import threading
import time

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from stages import registry


def test_health_reports_model_stages_queue_and_version(tiny_engine):
    with TestClient(create_app(tiny_engine, ServiceSettings(warmup=False))) as client:
        for _ in range(100):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        body = client.get("/health").json()
    assert body["status"] == "ready" and body["ready"] is True and body["version"]
    assert body["model"]["name"] == "tiny" and body["model"]["random_weights"] is True and body["model"]["warning"]
    assert body["device"] == "cpu" and body["memory"] == {"device": "cpu"}
    names = [row["name"] for row in body["stages"]]
    assert names == list(registry.STAGE_NAMES)
    attention = next(row for row in body["stages"] if row["name"] == "attention")
    assert attention["available"] is False and "CUDA" in attention["reason"] and attention["active"] is False
    assert body["queue"]["waiting"] == 0 and body["queue"]["capacity"] == 16


def test_ready_is_503_while_the_model_loads(tiny_engine):
    loaded = threading.Event()

    def slow_loader():
        loaded.wait(30)
        return tiny_engine

    with TestClient(create_app(settings=ServiceSettings(warmup=True), loader=slow_loader)) as client:
        loading = client.get("/ready")
        health = client.get("/health").json()
        edit = client.post("/inference", json={"prompt": "x"})
        loaded.set()
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        ready = client.get("/ready")
    assert loading.status_code == 503 and loading.json()["status"] == "loading" and loading.headers["Retry-After"]
    assert health["status"] == "loading" and health["model"] is None
    assert edit.status_code == 503 and edit.json()["error"]["type"] == "model_loading"
    assert ready.status_code == 200 and ready.json()["ready"] is True
