"""patches/cudagraph_trees_thread_state.py: a thread that did not import Inductor's CUDA graph trees
gets trees of its own (the service's build thread runs compiled graphs), and an unknown torch without
torch's own per-thread set-up is refused rather than patched."""

from __future__ import annotations

import threading

import pytest
from torch._inductor import cudagraph_trees

import patches
from patches import cudagraph_trees_thread_state as patch


def _containers_seen_by_a_new_thread(monkeypatch_2_11: bool, monkeypatch) -> tuple[object, str]:
    seen: dict = {}

    def run():
        try:
            seen["message"] = patch.prepare_thread()
            seen["containers"] = cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_containers")
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            seen["error"] = error

    if monkeypatch_2_11:  # torch 2.11's module: no per-thread set-up of its own
        monkeypatch.delattr(cudagraph_trees, "_initialize_tls")
        monkeypatch.setattr(patch, "_torch_base_version", lambda: "2.11.0")
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if "error" in seen:
        raise seen["error"]
    return seen["containers"], seen["message"]


@pytest.mark.parametrize("torch_2_11", [False, True], ids=["this-torch", "torch-2.11-shape"])
def test_a_new_thread_gets_trees_of_its_own(torch_2_11, monkeypatch):
    containers, message = _containers_seen_by_a_new_thread(torch_2_11, monkeypatch)
    assert isinstance(containers, dict)
    assert containers is not cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_containers")  # not the importer's
    assert ("trees of its own" in message) if torch_2_11 else ("nothing to do" in message)


def test_an_unknown_torch_without_per_thread_set_up_is_refused(monkeypatch):
    monkeypatch.delattr(cudagraph_trees, "_initialize_tls")
    monkeypatch.setattr(patch, "_torch_base_version", lambda: "2.12.0")
    with pytest.raises(patches.PatchVersionError, match="written for torch 2.11.0"):
        patch.prepare_thread()
