"""/health answers with the loaded model and every stage's status."""

from fastapi.testclient import TestClient

import stages
from service.app import create_app


def test_health_reports_model_and_stages(tiny_engine):
    client = TestClient(create_app(tiny_engine))
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["model"]["name"] == "tiny" and body["model"]["random_weights"] is True and body["model"]["warning"]
    names = [row["name"] for row in body["stages"]]
    assert names == list(stages.STAGE_NAMES)
    attention = next(row for row in body["stages"] if row["name"] == "attention")
    assert attention["available"] is False and "CUDA" in attention["reason"]
