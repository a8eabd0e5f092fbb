"""CLIP and T5 tokenizers for the tiny and synthetic models, so that they need no download. They
split text like the real ones (BPE with `</w>` word ends for CLIP, SentencePiece-style Unigram for
T5) over a small embedded vocabulary of editing words; unknown words fall back to characters.

The vocabularies are trained once with the `tokenizers` library and shipped in
`tiny_tokenizers.json` beside this file. They used to be trained in every process, but the trainers
are not deterministic across processes (even with PYTHONHASHSEED fixed): BPE numbers tied merges
in a different order, and Unigram scores the characters the corpus lacks differently, so two
processes gave different token ids, and two workers or two context-parallel ranks gave different
images for one seed. After a change to the
corpus or the trainer settings below, write the file again with

    python -m engine.tokenizers_offline

(tests/test_tokenizers_offline.py checks that the file still matches these settings).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

VOCAB_FILE = Path(__file__).with_name("tiny_tokenizers.json")
CLIP_VOCAB_SIZE = 600
T5_VOCAB_SIZE = 400

_WORDS = """
a an the of to in on at with and or but is are be make turn change add remove replace put keep
into from as it its this that these those while without more less very sky red blue green yellow
orange purple pink black white gray brown gold silver color colors bright dark light shadow sun
sunset sunrise night day morning evening cloud clouds rain snow fog storm winter summer autumn
spring mountain mountains lake river sea ocean beach forest tree trees flower flowers grass field
city street road building house window door car bus bike boat person man woman child people face
hair eyes smile hat glasses shirt dress jacket cat dog bird horse fish animal photo image picture
painting watercolor oil sketch cartoon anime style realistic cinematic portrait landscape majestic
background foreground text sign logo letter word font old new big small tall short wide front back
left right top bottom center edge sharp soft blur detail lighting golden hour neon vintage modern
""".split()
_CORPUS = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(0, len(_WORDS), 7)]
_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()")


def train_vocabularies() -> dict:
    """Train both vocabularies (tie-breaking differs between processes: run once, ship the file)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=CLIP_VOCAB_SIZE,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, bpe_trainer)
    clip = json.loads(bpe.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in clip["merges"]]

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram_trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    unigram.train_from_iterator(_CORPUS, unigram_trainer)
    t5 = json.loads(unigram.to_str())["model"]["vocab"]
    return {"corpus_words": len(_WORDS), "clip": {"vocab": clip["vocab"], "merges": merges}, "t5": {"vocab": t5}}


@functools.lru_cache(maxsize=None)
def _vocabularies() -> dict:
    if not VOCAB_FILE.is_file():
        raise FileNotFoundError(f"{VOCAB_FILE} is missing: write it with `python -m engine.tokenizers_offline`")
    return json.loads(VOCAB_FILE.read_text())


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    clip = _vocabularies()["clip"]
    return CLIPTokenizer(vocab=dict(clip["vocab"]), merges=[tuple(pair) for pair in clip["merges"]], model_max_length=77)


def build_t5_tokenizer():
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=[tuple(entry) for entry in _vocabularies()["t5"]["vocab"]], extra_ids=0, model_max_length=512)


if __name__ == "__main__":
    VOCAB_FILE.write_text(json.dumps(train_vocabularies(), indent=0, ensure_ascii=False) + "\n")
    print(f"wrote {VOCAB_FILE}")
