"""The tiny model's tokenizers: the same ids in every process (workers and context-parallel ranks
must agree), and the shipped vocabularies still match the training settings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from engine.tokenizers_offline import _vocabularies, build_clip_tokenizer, build_t5_tokenizer, train_vocabularies
from tests.service_server import ROOT

PROMPTS = ["make it blue and add a hat", "A majestic mountain landscape at sunset", "turn the zebra into a neon sketch!"]
PRINT_IDS = (
    "import json; from engine.tokenizers_offline import build_clip_tokenizer, build_t5_tokenizer; "
    f"prompts = {PROMPTS!r}; "
    "print(json.dumps([[build_clip_tokenizer()(p).input_ids, build_t5_tokenizer()(p).input_ids] for p in prompts]))"
)


def test_two_fresh_processes_tokenize_identically():
    runs = [subprocess.run([sys.executable, "-c", PRINT_IDS], cwd=ROOT, capture_output=True, text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (json.loads(run.stdout) for run in runs)
    here = [[build_clip_tokenizer()(p).input_ids, build_t5_tokenizer()(p).input_ids] for p in PROMPTS]
    assert first == second == here


def test_shipped_vocabularies_match_the_training_settings():
    """Training again gives the same tokens and merges, so the file is not stale. (What varies
    between processes: the ids of tied BPE merges, and the Unigram scores of the characters that
    never occur in the corpus, by a few thousandths.)"""
    shipped, fresh = _vocabularies(), train_vocabularies()
    assert shipped["corpus_words"] == fresh["corpus_words"]
    assert set(shipped["clip"]["vocab"]) == set(fresh["clip"]["vocab"])
    assert sorted(map(tuple, shipped["clip"]["merges"])) == sorted(map(tuple, fresh["clip"]["merges"]))
    shipped_t5, fresh_t5 = dict(map(tuple, shipped["t5"]["vocab"])), dict(map(tuple, fresh["t5"]["vocab"]))
    assert set(shipped_t5) == set(fresh_t5)
    assert all(math.isclose(shipped_t5[token], fresh_t5[token], abs_tol=0.01) for token in shipped_t5)
