"""Cold start on the CPU: compile-artifact bundles (key check, foreign, corrupt and truncated bundles),
dynamic sequence lengths (a new resolution compiles nothing), and the warm-shape report."""

from __future__ import annotations

import dataclasses
import json
import time
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient

from engine.compile_artifacts import bundle_key, key_id, load_bundle, read_manifest, save_bundle
from engine.requests import EditRequest
from engine.warmup import Shape, shapes_for, warm_up
from service.app import create_app
from service.settings import ServiceSettings
from stages.config import OptimizationConfig


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, cpu_env):
    """A real bundle: something compiled in this process, saved by the product's own code."""
    compiled = torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True)
    compiled(torch.randn(8))
    key = bundle_key(cpu_env, OptimizationConfig(compile=True))
    path = save_bundle(tmp_path_factory.mktemp("bundle") / "kontext.zip", key, [{"width": 8, "height": 8, "edit": True}])
    return path, key


def test_a_matching_bundle_loads_and_says_what_it_holds(bundle):
    path, key = bundle
    manifest = read_manifest(path)
    assert manifest["key"] == key and manifest["key_id"] == key_id(key) and manifest["artifacts_bytes"] > 0
    outcome = load_bundle(path, key)
    assert outcome.loaded and outcome.reason == "loaded" and outcome.megabytes >= 0


def test_the_key_names_the_gpu_the_versions_and_the_build_config(cpu_env):
    key = bundle_key(cpu_env, OptimizationConfig(compile=True))
    assert key["gpu"] == "cpu" and key["packages"]["torch"] and key["packages"]["diffusers"]
    assert key["config"]["compile"] is True and "cache_threshold" not in key["config"]  # per-request knobs change no code
    assert key_id(key) != key_id(bundle_key(cpu_env, OptimizationConfig(compile=True, quantization="fp8")))


def test_a_bundle_for_another_setup_is_skipped_with_the_reason(bundle, cpu_env):
    path, _ = bundle
    other = bundle_key(cpu_env, OptimizationConfig(compile=True, attention="fa3"))
    outcome = load_bundle(path, other)
    assert not outcome.loaded and "another setup" in outcome.reason and "config" in outcome.reason


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "bad checksum", "no manifest", "missing"])
def test_a_damaged_bundle_never_raises(bundle, tmp_path, damage):
    path, key = bundle
    broken = tmp_path / "broken.zip"
    data = path.read_bytes()
    if damage == "truncated":
        broken.write_bytes(data[: len(data) // 2])
    elif damage == "not a zip":
        broken.write_bytes(b"this is not a bundle")
    elif damage == "bad checksum":
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(broken, "w") as target:
            target.writestr("manifest.json", source.read("manifest.json"))
            target.writestr("artifacts.bin", source.read("artifacts.bin")[:-1] + b"x")
    elif damage == "no manifest":
        with zipfile.ZipFile(broken, "w") as target:
            target.writestr("artifacts.bin", b"123")
    outcome = load_bundle(tmp_path / "nothing.zip" if damage == "missing" else broken, key)
    assert not outcome.loaded and outcome.reason
    if damage == "bad checksum":
        assert "checksum" in outcome.reason


def test_a_new_resolution_compiles_nothing(tiny_engine):
    """The sequence dimensions are dynamic from the first compile: Dynamo's graph count stays put."""
    from torch._dynamo.utils import counters

    config = OptimizationConfig(compile=True)
    tiny_engine.edit(EditRequest(prompt="x", width=64, height=64, steps=1, seed=0), config)
    graphs = counters["stats"]["unique_graphs"]
    for width, height in ((96, 48), (48, 112)):
        tiny_engine.edit(EditRequest(prompt="x", width=width, height=height, steps=1, seed=0), config)
    assert counters["stats"]["unique_graphs"] == graphs


def test_full_size_models_warm_every_preferred_resolution_for_edits_and_text(tiny_engine, monkeypatch):
    from engine.sizes import KONTEXT_RESOLUTIONS

    monkeypatch.setattr(tiny_engine.loaded, "spec", dataclasses.replace(tiny_engine.loaded.spec, snap_input_to_kontext_resolutions=True))
    shapes = [shape for shape in shapes_for(tiny_engine) if shape.lora is None]
    assert len(shapes) == 2 * len(KONTEXT_RESOLUTIONS) == 34
    assert shapes[0] == Shape(1024, 1024, True)  # the default size compiles first
    assert (
        {(s.width, s.height) for s in shapes if s.edit} == set(KONTEXT_RESOLUTIONS) == {(s.width, s.height) for s in shapes if not s.edit}
    )


def test_warm_up_reports_each_shape_and_its_phases(tiny_engine):
    report = warm_up(tiny_engine, OptimizationConfig(), [Shape(64, 64, True), Shape(64, 64, False)])
    assert [(row["width"], row["edit"]) for row in report.shapes] == [(64, True), (64, False)]
    assert report.phases["first_shape_s"] > 0 and "other_shapes_s" in report.phases and report.total_s > 0


def test_health_reports_the_warm_up_and_the_artifacts(tiny_engine, tmp_path):
    settings = ServiceSettings(warmup=True, compile_artifacts=str(tmp_path / "absent.zip"))
    with TestClient(create_app(tiny_engine, settings)) as client:
        deadline = time.monotonic() + 240
        while not (client.get("/health").json()["warmup"] or {}).get("done"):  # /ready after the first shape, the rest while idle
            assert time.monotonic() < deadline
            time.sleep(0.1)
        startup = client.get("/health").json()["startup"]
    assert startup["compile_artifacts"] == {**startup["compile_artifacts"], "loaded": False, "reason": "no bundle at this path"}
    assert [(row["width"], row["height"], row["edit"]) for row in startup["warmup"]["shapes"]] == [(256, 256, True), (256, 256, False)]
    assert json.dumps(startup)  # JSON-ready
