"""LoRA adapters over HTTP, in process (tiny model): list, load and unload by name, the original
/lora body, per-request adapters on every editing route, 4xx answers that name the problem and
change nothing, interleaved requests that keep their own adapters, /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import safetensors.torch
import torch

from engine.engine import KontextEngine
from engine.lora_settings import LoraSettings
from service.app import create_app
from service.settings import ServiceSettings
from tests.asgi_client import ready_client
from tests.conftest import LORA_TEST_RANK
from tests.test_lora_files import BAD_FILES, _bad_files

SMALL = {"prompt": "make the sky red", "width": 32, "height": 32, "steps": 2, "seed": 3}
MAX_MB = 1.0


@pytest.fixture(scope="module")
def lora_server(tiny_engine, lora_dir, tmp_path_factory):
    """An app over the tiny model whose LoRA directory is private to this module (bad files go there)."""
    directory = tmp_path_factory.mktemp("service-loras")
    for name in ("style", "kohya"):
        shutil.copy(lora_dir / f"{name}.safetensors", directory / f"{name}.safetensors")
    settings = LoraSettings(directory=str(directory), max_rank=LORA_TEST_RANK, max_mb=MAX_MB)
    engine = KontextEngine(tiny_engine.loaded, tiny_engine.env, max_variants=8, lora=settings)
    return create_app(engine, ServiceSettings(warmup=False)), directory


def scenario(app, steps):
    """Run `steps(client)` against a started app."""

    async def run():
        async with await ready_client(app, timeout=120) as client:
            return await steps(client)

    return asyncio.run(run())


async def _image(client, **body) -> str:
    response = await client.post("/inference", json={**SMALL, **body})
    assert response.status_code == 200, response.text
    return response.json()["images"][0]


def test_list_load_and_unload_by_name(lora_server):
    app, _ = lora_server

    async def steps(client):
        listed = (await client.get("/v1/loras")).json()
        assert {"style", "kohya"} <= set(listed["available"]) and listed["loaded"] == [] and listed["slots"] == 2
        first = await client.post("/v1/loras", json={"name": "style"})
        again = await client.post("/v1/loras", json={"name": "style"})
        assert first.status_code == 200 and not first.json()["replaced"] and again.json()["replaced"]
        info = first.json()["loaded"]
        assert (info["name"], info["rank"], info["layers"], info["default_scale"]) == ("style", 4, 39, 1.0) and info["memory_mb"] > 0
        assert "transformer_blocks.*.ff.net.0.proj" in info["targets"]
        assert [row["name"] for row in (await client.get("/v1/loras")).json()["loaded"]] == ["style"]
        gone = await client.delete("/v1/loras/style")
        missing = await client.delete("/v1/loras/style")
        assert gone.json() == {"name": "style", "unloaded": True}
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        assert (await client.get("/v1/loras")).json()["loaded"] == []

    scenario(app, steps)


def test_a_bad_adapter_gets_a_4xx_naming_the_problem_and_changes_nothing(lora_server):
    app, directory = lora_server
    makers = _bad_files(directory)
    big = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32), "padding": torch.zeros(int(MAX_MB * 2**20 / 4))}
    safetensors.torch.save_file(big, str(directory / "big.safetensors"))

    async def steps(client):
        assert (await client.post("/v1/loras", json={"name": "style"})).status_code == 200
        listed, base, styled = (await client.get("/v1/loras")).json(), await _image(client), await _image(client, loras=[{"name": "style"}])
        answers = []
        for case in BAD_FILES:
            makers[case][0]()
            response = await client.post("/v1/loras", json={"name": "bad"})
            answers.append((case, response.status_code, response.json()["error"], makers[case][1]))
        for name, status, phrase in [
            ("big", 422, "over this server's"),
            ("../style", 422, "not an adapter name"),
            ("sub/style", 422, "never a path"),
        ]:
            response = await client.post("/v1/loras", json={"name": name})
            answers.append((name, response.status_code, response.json()["error"], phrase))
        response = await client.post("/v1/loras", json={"name": "missing"})
        answers.append(("missing", response.status_code, response.json()["error"], "no adapter file"))
        assert (await client.get("/v1/loras")).json()["loaded"] == listed["loaded"]
        assert await _image(client) == base and await _image(client, loras=[{"name": "style"}]) == styled
        await client.delete("/v1/loras/style")
        return answers

    for case, status, error, phrase in scenario(app, steps):
        assert status == (404 if case == "missing" else 422), (case, error)
        assert error["field"] == "name" and phrase in error["message"], (case, error)


def test_the_original_lora_body_takes_files_in_the_directory_only(lora_server):
    app, directory = lora_server

    async def steps(client):
        loaded = await client.post("/lora", json={"path": "kohya.safetensors", "action": "load", "scale": 0.5})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["loaded"]["name"] == "kohya" and loaded.json()["loaded"]["default_scale"] == 0.5
        renamed = await client.post("/lora", json={"path": str(directory / "style.safetensors"), "name": "my-style"})
        assert renamed.status_code == 200 and renamed.json()["warnings"] == ["loaded from style.safetensors under the name 'my-style'"]
        refusals = [
            await client.post("/lora", json={"path": "../kohya.safetensors"}),
            await client.post("/lora", json={"path": "/etc/passwd", "name": "x"}),
            await client.post("/lora", json={"path": "kohya.bin"}),
            await client.post("/lora", json={"action": "load"}),
        ]
        unloaded = [await client.post("/lora", json={"name": name, "action": "unload"}) for name in ("kohya", "my-style")]
        return refusals, unloaded, (await client.get("/v1/loras")).json()["loaded"]

    refusals, unloaded, loaded_after = scenario(app, steps)
    assert [response.status_code for response in refusals] == [422, 422, 422, 422]
    assert [response.json()["error"]["field"] for response in refusals] == ["path", "path", "path", "name"]
    assert "outside the server's LoRA directory" in refusals[0].json()["error"]["message"]
    assert all(str(directory) not in response.text for response in refusals)  # clients never learn the server's paths
    assert all(response.json() == {"name": name, "unloaded": True} for response, name in zip(unloaded, ("kohya", "my-style")))
    assert loaded_after == []


def test_every_editing_route_takes_per_request_adapters_that_end_with_the_request(lora_server):
    app, _ = lora_server
    loras = [{"name": "style", "scale": 0.8}, {"name": "kohya"}]

    async def steps(client):
        for name in ("style", "kohya"):
            await client.post("/v1/loras", json={"name": name})
        base = await _image(client)
        response = await client.post("/inference", json={**SMALL, "loras": loras})
        body = response.json()
        assert body["extras"]["lora"]["adapters"] == [
            {"name": "style", "scale": 0.8, "rank": 4},
            {"name": "kohya", "scale": 1.0, "rank": 2},
        ]
        assert "lora" in body["active_stages"] and body["images"][0] != base
        assert await _image(client) == base  # the next request without adapters: the base again
        form = {key: (None, str(value)) for key, value in SMALL.items()} | {"loras": (None, json.dumps(loras))}
        multipart = await client.post("/inference", files=form)
        assert multipart.json()["images"][0] == body["images"][0]
        generation = await client.post(
            "/v1/images/generations", json={"prompt": SMALL["prompt"], "size": "32x32", "steps": 2, "seed": 3, "loras": loras}
        )
        assert generation.json()["data"][0]["b64_json"] == body["images"][0]  # PNG either way, same pixels, same encoder
        png = base64_png(body["images"][0])
        edits = [
            await client.post("/v1/images/edits", files={"image": ("in.png", png), "prompt": (None, "x"), "size": (None, "32x32"), **extra})
            for extra in ({}, {"loras": (None, json.dumps(loras))})
        ]
        assert edits[0].status_code == edits[1].status_code == 200 and edits[0].json()["data"] != edits[1].json()["data"]
        for name in ("style", "kohya"):
            await client.delete(f"/v1/loras/{name}")

    scenario(app, steps)


def base64_png(b64: str) -> bytes:
    import base64

    return base64.b64decode(b64)


def test_interleaved_requests_keep_their_own_adapters(lora_server):
    app, _ = lora_server
    sets = [None, [{"name": "style"}], [{"name": "kohya", "scale": 0.6}], [{"name": "style"}, {"name": "kohya", "scale": 0.6}]]

    async def steps(client):
        for name in ("style", "kohya"):
            await client.post("/v1/loras", json={"name": name})
        alone = [await _image(client, loras=loras) for loras in sets]
        order = [0, 1, 2, 3, 1, 0, 3, 2, 2, 1, 0]
        together = await asyncio.gather(*(_image(client, loras=sets[index]) for index in order))  # all queued at once
        for name in ("style", "kohya"):
            await client.delete(f"/v1/loras/{name}")
        return alone, order, together

    alone, order, together = scenario(app, steps)
    assert len(set(alone)) == len(sets)
    assert [alone[index] for index in order] == list(together)


@pytest.mark.parametrize(
    "loras, status, field, phrase",
    [
        ([{"name": "nowhere"}], 404, "loras[0].name", "no adapter 'nowhere'"),
        ([{"name": "a"}, {"name": "b"}, {"name": "c"}], 422, "loras", "at most 2"),
        ([{"name": "x", "scale": 100}], 422, "loras.0.scale", "less than or equal to 8"),
        ([{"name": "x", "scale": True}], 422, "loras.0.scale", "boolean"),
        ([{"name": "x", "path": "/etc/passwd"}], 422, "loras.0.path", "unknown field"),
        ({"name": "x"}, 422, "loras", "valid array"),
    ],
)
def test_a_bad_adapter_list_on_a_request_is_a_422_before_the_queue(lora_server, loras, status, field, phrase):
    app, _ = lora_server

    def inference_jobs(metrics: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith('kontext_jobs_total{kind="inference"'))

    async def steps(client):
        before = (await client.get("/metrics")).text
        response = await client.post("/inference", json={**SMALL, "loras": loras})
        return response, inference_jobs(before), inference_jobs((await client.get("/metrics")).text)

    response, jobs_before, jobs_after = scenario(app, steps)
    error = response.json()["error"]
    assert response.status_code == status and error["field"] == field and phrase in error["message"], error
    assert jobs_after == jobs_before  # answered without a trip through the GPU queue


def test_health_and_metrics_report_adapters_and_swap_times(lora_server):
    app, _ = lora_server

    async def steps(client):
        await client.post("/v1/loras", json={"name": "style"})
        await _image(client, loras=[{"name": "style"}])
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
        await client.delete("/v1/loras/style")
        return health, metrics

    health, metrics = scenario(app, steps)
    loras = health["loras"]
    assert [row["name"] for row in loras["loaded"]] == ["style"] and loras["swaps"]["count"] >= 1 and loras["swaps"]["last_ms"] > 0
    assert "directory" not in loras and "available" not in loras  # /health answers anyone: no file names
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert values["kontext_loras_loaded"] == 1 and values["kontext_lora_memory_bytes"] > 0
    assert values["kontext_lora_swap_seconds_count"] >= 1 and values["kontext_lora_edits_total"] >= 1
    assert values['kontext_lora_loads_total{outcome="ok"}'] >= 1


def test_merge_mode_over_http_counts_changes_not_requests(tiny_engine, lora_dir):
    """serve --lora-mode merge: /v1/loras and /health say so; a request with the adapters already
    merged swaps nothing, and the request after them without adapters pays the restore, which is a
    swap but not an edit with adapters."""
    from tests.test_lora_merge import merge_engine_for

    app = create_app(merge_engine_for(tiny_engine, lora_dir), ServiceSettings(warmup=False))

    async def steps(client):
        images = [await _image(client, loras=[{"name": "style"}]) for _ in range(2)]
        images.append(await _image(client))
        listed, health = (await client.get("/v1/loras")).json(), (await client.get("/health")).json()
        return images, listed, health, (await client.get("/metrics")).text

    images, listed, health, metrics = scenario(app, steps)
    assert images[0] == images[1] != images[2]
    assert listed["mode"] == "merge" and health["loras"]["mode"] == "merge"
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert values["kontext_lora_edits_total"] == 2  # the two requests that named the adapter
    assert values["kontext_lora_swap_seconds_count"] == 2 and health["loras"]["swaps"]["count"] == 2  # merge, then restore


def test_a_request_naming_an_unloaded_adapter_loads_it_and_nothing_leaks(lora_server):
    """A request alone is enough: `detail` is a file in the directory, not loaded. The request loads
    it (its timings say how long), gets what it gets after an explicit load, and the next request
    without adapters gets the base; a name that is no file is a 404 that names it, not the directory."""
    app, directory = lora_server
    shutil.copy(directory / "style.safetensors", directory / "detail.safetensors")

    async def steps(client):
        base = await _image(client)
        first_use = await client.post("/inference", json={**SMALL, "loras": [{"name": "detail", "scale": 0.9}]})
        after = await _image(client)
        listed = await client.get("/v1/loras")
        await client.delete("/v1/loras/detail")
        assert (await client.post("/v1/loras", json={"name": "detail"})).status_code == 200
        explicit = await _image(client, loras=[{"name": "detail", "scale": 0.9}])
        await client.delete("/v1/loras/detail")
        missing = await client.post("/inference", json={**SMALL, "loras": [{"name": "elsewhere"}]})
        metrics = (await client.get("/metrics")).text
        return base, first_use, after, listed, explicit, missing, metrics

    base, first_use, after, listed, explicit, missing, metrics = scenario(app, steps)
    body = first_use.json()
    assert first_use.status_code == 200, first_use.text
    assert body["timings"]["lora_load_s"] > 0 and [row["name"] for row in body["extras"]["lora"]["loaded"]] == ["detail"]
    assert body["images"][0] == explicit != base  # the same pixels as after an explicit load, and the adapter did something
    assert after == base  # nothing carried over
    assert "detail" in [row["name"] for row in listed.json()["loaded"]]
    assert 'kontext_lora_loads_total{outcome="first_use"} 1.0' in metrics
    error = missing.json()["error"]
    assert missing.status_code == 404 and error["field"] == "loras[0].name" and "'elsewhere'" in error["message"]
    for response in (missing, listed):
        assert str(directory) not in response.text and "directory" not in response.json()
