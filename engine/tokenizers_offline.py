"""CLIP and T5 tokenizers trained in code with the `tokenizers` library, so that the tiny and
synthetic models need no download. They split text like the real ones (BPE with `</w>` word ends
for CLIP, SentencePiece-style Unigram for T5) over a small embedded vocabulary of editing words;
unknown words fall back to characters. Training is deterministic for a fixed corpus.
"""

from __future__ import annotations

import functools
import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, T5Tokenizer

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


@functools.lru_cache(maxsize=None)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


@functools.lru_cache(maxsize=None)
def _t5_vocab() -> list[tuple[str, float]]:
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    unigram.train_from_iterator(_CORPUS, trainer)
    return [tuple(entry) for entry in json.loads(unigram.to_str())["model"]["vocab"]]


def build_clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer() -> T5Tokenizer:
    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512)
