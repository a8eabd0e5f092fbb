"""The LoRA library: adapter files by name, converted as diffusers converts them, and every bad file
or name refused with the problem named, the library and the model exactly as they were."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import safetensors.torch
import torch

from engine.lora_files import LoraError, file_in_directory
from engine.lora_settings import LoraSettings
from engine.loras import LoraLibrary
from engine.requests import LoraChoice
from tests.conftest import LORA_TEST_RANK

Q = "transformer.transformer_blocks.0.attn.to_q"  # a 32 -> 32 Linear of the tiny model


@pytest.fixture
def library(tiny_engine, lora_dir, tmp_path):
    """A library over a private directory holding copies of the session's adapters."""
    for name in ("style", "kohya"):
        shutil.copy(lora_dir / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    settings = LoraSettings(directory=str(tmp_path), max_rank=LORA_TEST_RANK, max_loaded=3)
    return LoraLibrary(settings, tiny_engine.loaded.pipe.transformer, torch.device("cpu"), torch.float32)


def _write(directory, name: str, tensors: dict) -> None:
    safetensors.torch.save_file({key: value.contiguous() for key, value in tensors.items()}, str(directory / f"{name}.safetensors"))


def _diffusers_deltas(pipe, path) -> dict[str, torch.Tensor]:
    """What diffusers adds to each Linear's weight for this adapter at scale 1: scaling * B @ A."""
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(path), adapter_name="x")
    deltas = {}
    for name, module in reference.transformer.named_modules():
        if hasattr(module, "lora_A") and "x" in module.lora_A:
            deltas[name] = module.scaling["x"] * module.lora_B["x"].weight @ module.lora_A["x"].weight
    return deltas


@pytest.mark.parametrize("name", ["style", "kohya"])
def test_each_layout_holds_what_diffusers_loads(tiny_engine, library, lora_dir, name):
    adapter = library.load(name)
    expected = _diffusers_deltas(tiny_engine.loaded.pipe, lora_dir / f"{name}.safetensors")
    assert set(adapter.weights.modules) == set(expected)
    for module, factors in adapter.weights.modules.items():
        torch.testing.assert_close(factors.up @ factors.down, expected[module], rtol=1e-5, atol=1e-6)
    if name == "kohya":  # sd-scripts fuses q, k and v in one module; the library holds them unfused, at rank 2 each
        assert adapter.weights.rank == 2 and "transformer_blocks.0.attn.to_k" in adapter.weights.modules
    summary = adapter.summary()
    assert summary["layers"] == len(expected) and summary["memory_mb"] > 0 and summary["file"] == f"{name}.safetensors"
    assert "transformer_blocks.*.attn.to_q" in summary["targets"]


def _valid(directory):
    return safetensors.torch.load_file(str(directory / "style.safetensors"))


def _bad_files(directory):
    """name -> (how to make it, a phrase the refusal must contain)."""
    good = _valid(directory)

    def with_changes(**tensors):
        return lambda: _write(directory, "bad", {**good, **{k.replace("__", "."): v for k, v in tensors.items()}})

    def raw(data: bytes):
        return lambda: (directory / "bad.safetensors").write_bytes(data)

    def truncated():
        data = (directory / "style.safetensors").read_bytes()
        (directory / "bad.safetensors").write_bytes(data[: len(data) // 2])

    def pickled():
        torch.save(good, str(directory / "bad.safetensors"))

    return {
        "pickle": (pickled, "not a safetensors file"),
        "text": (raw(b"hello, I am not an adapter"), "not a safetensors file"),
        "truncated": (truncated, "truncated"),
        "narrow A": (with_changes(**{f"{Q}.lora_A.weight": torch.randn(4, 16)}), "16 -> 32 features"),
        "wide A": (with_changes(**{f"{Q}.lora_A.weight": torch.randn(4, 48)}), "48 -> 32 features"),
        "wrong B": (with_changes(**{f"{Q}.lora_B.weight": torch.randn(40, 4)}), "32 -> 40 features"),
        "unknown layer": (
            with_changes(
                **{"transformer.nowhere.lora_A.weight": torch.randn(4, 32), "transformer.nowhere.lora_B.weight": torch.randn(32, 4)}
            ),
            "not a Linear of this model",
        ),
        "rank over the limit": (
            with_changes(**{f"{Q}.lora_A.weight": torch.randn(16, 32), f"{Q}.lora_B.weight": torch.randn(32, 16)}),
            f"over this server's maximum {LORA_TEST_RANK}",
        ),
        "NaN": (with_changes(**{f"{Q}.lora_B.weight": torch.full((32, 4), float("nan"))}), "NaN"),
        "DoRA": (with_changes(**{f"{Q}.lora_magnitude_vector": torch.ones(32)}), "DoRA"),
        "integer tensors": (with_changes(**{f"{Q}.lora_A.weight": torch.ones(4, 32, dtype=torch.int8)}), "dtype"),
    }


BAD_FILES = ["pickle", "text", "truncated", "narrow A", "wide A", "wrong B", "unknown layer", "rank over the limit", "NaN", "DoRA"]


@pytest.mark.parametrize("case", BAD_FILES + ["integer tensors"])
def test_a_bad_file_is_refused_naming_the_problem_and_changes_nothing(library, tmp_path, case):
    library.load("style")
    before = {adapter.name: adapter for adapter in library.loaded()}
    make, phrase = _bad_files(tmp_path)[case]
    make()
    with pytest.raises(LoraError, match=phrase) as refused:
        library.load("bad")
    assert refused.value.status == 422
    assert {adapter.name: adapter for adapter in library.loaded()} == before


def test_a_refused_new_version_keeps_the_loaded_one(library, tmp_path):
    loaded = library.load("style")
    data = (tmp_path / "style.safetensors").read_bytes()
    (tmp_path / "style.safetensors").write_bytes(data[:-100])
    with pytest.raises(LoraError, match="truncated"):
        library.load("style")
    assert library.loaded() == [loaded]


def test_the_size_limit_is_checked_before_reading(tiny_engine, lora_dir):
    size = os.path.getsize(lora_dir / "style.safetensors")
    settings = LoraSettings(directory=str(lora_dir), max_mb=(size - 1) / 2**20)
    small = LoraLibrary(settings, tiny_engine.loaded.pipe.transformer, torch.device("cpu"), torch.float32)
    with pytest.raises(LoraError, match="over this server's"):
        small.load("style")


@pytest.mark.parametrize("name", ["../style", "loras/style", "/etc/passwd", "..", ".hidden", "", "a" * 65, "sty le", "style\x00"])
def test_a_name_with_a_path_in_it_is_refused(library, name):
    with pytest.raises(LoraError, match="not an adapter name") as refused:
        library.load(name)
    assert refused.value.status == 422 and library.loaded() == []


def test_a_symbolic_link_out_of_the_directory_is_refused(library, tmp_path_factory, tmp_path):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.safetensors"
    shutil.copy(tmp_path / "style.safetensors", outside)
    (tmp_path / "escape.safetensors").symlink_to(outside)
    with pytest.raises(LoraError, match="outside the LoRA directory"):
        library.load("escape")
    assert "escape" in library.available()  # listed, since its name is valid, but never loaded


def test_a_missing_file_is_a_404(library):
    with pytest.raises(LoraError, match="no adapter file") as refused:
        library.load("missing")
    assert refused.value.status == 404


def test_the_number_of_loaded_adapters_is_bounded_but_a_reload_is_not_an_extra(library, tmp_path):
    for name in ("a", "b", "c", "d"):
        shutil.copy(tmp_path / "style.safetensors", tmp_path / f"{name}.safetensors")
    for name in ("a", "b", "c"):
        library.load(name)
    library.load("a")  # the same name again: replaced, not added
    with pytest.raises(LoraError, match="already loaded") as refused:
        library.load("d")
    assert refused.value.status == 409
    library.unload("a")
    assert library.load("d").name == "d"


def test_the_seed_apis_path_must_name_a_file_in_the_directory(tmp_path):
    directory = str(tmp_path)
    assert file_in_directory(directory, "style.safetensors") == "style.safetensors"
    assert file_in_directory(directory, "./style.safetensors") == "style.safetensors"
    assert file_in_directory(directory, str(tmp_path / "style.safetensors")) == "style.safetensors"
    for path, phrase in [
        ("../style.safetensors", "outside"),
        ("/etc/passwd", "outside"),
        ("sub/style.safetensors", "outside"),
        ("~/style.safetensors", "outside"),
        ("style.ckpt", "only .safetensors"),
        ("", "must name"),
    ]:
        with pytest.raises(LoraError, match=phrase):
            file_in_directory(directory, path)


def test_loading_and_refusing_never_touch_the_model(tiny_engine, library, tmp_path):
    transformer = tiny_engine.loaded.pipe.transformer
    before = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    library.load("style")
    library.load("kohya")
    _bad_files(tmp_path)["wide A"][0]()  # diffusers itself would replace the base Linear for this one
    with pytest.raises(LoraError):
        library.load("bad")
    library.unload("style")
    after = transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert type(transformer.transformer_blocks[0].attn.to_q) is torch.nn.Linear


def test_adapters_named_by_requests_load_on_first_use_and_the_least_recently_used_makes_room(library, lora_dir):
    for name, source in (("detail", "detail"), ("spare", "style")):
        shutil.copy(lora_dir / f"{source}.safetensors", library.directory / f"{name}.safetensors")
    loads: list = []
    library.pick([LoraChoice("style"), LoraChoice("kohya")], loads)
    library.pick([LoraChoice("detail")], loads)
    assert [name for name, seconds in loads] == ["style", "kohya", "detail"] and all(seconds > 0 for _, seconds in loads)
    library.pick([LoraChoice("style")])  # used again: kohya is now the least recently used
    library.pick([LoraChoice("spare")], loads)  # full (max_loaded 3): kohya makes room
    assert sorted(adapter.name for adapter in library.loaded()) == ["detail", "spare", "style"]
    with pytest.raises(LoraError) as unknown:
        library.pick([LoraChoice("nowhere")])
    assert unknown.value.status == 404 and str(library.directory) not in str(unknown.value)
