"""Train a BPE vocabulary in BlenderbotSmall's file format (`@@` vocab.json, `</w>` merges.txt) with `tokenizers`."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter

from bbsmall_jax.errors import UsageError, UsageTypeError
from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer
from bbsmall_jax.text.reference import (CONTINUATION, END_OF_WORD, SURROGATE, WORD_RE, special_token_pattern,
                                        symbol_token, word_pieces)

SPECIAL_TOKENS = ("__null__", "__start__", "__end__", "__unk__")  # ids 0-3, as in the released checkpoint


def _piece_counts(texts) -> Counter:
    """How often each lowercased BPE piece occurs, pre-tokenized exactly as encoding will do it."""
    words = Counter()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UsageTypeError(f"texts must be str; item {i} is {type(text).__name__}")
        words.update(WORD_RE.findall(text))
    specials = special_token_pattern(SPECIAL_TOKENS)
    pieces = Counter()
    for word, count in words.items():
        for part in filter(None, specials.split(word)):
            if part not in SPECIAL_TOKENS:
                for w in WORD_RE.findall(part):
                    for piece in word_pieces(w):
                        pieces[piece] += count
    return pieces


def train_tokenizer(texts, vocab_size: int, directory=None, min_frequency: int = 2) -> BlenderbotSmallTokenizer:
    """Learn a BPE vocabulary of at most `vocab_size` tokens on `texts`, saved to `directory` if given.

    Special tokens get ids 0-3 and every character seen gets both of its tokens ("c@@" and "c"), so only
    characters never seen in training become `__unk__`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    pieces = _piece_counts(texts)
    pieces = Counter({p: n for p, n in pieces.items() if not SURROGATE.search(p)})
    alphabet = sorted({ch for piece in pieces for ch in piece})
    word_final = {piece[-1] for piece in pieces}
    smallest = len(SPECIAL_TOKENS) + 2 * len(alphabet)
    if vocab_size < smallest:
        raise UsageError(f"vocab_size={vocab_size} cannot hold the 4 special tokens and both forms of the "
                         f"{len(alphabet)} characters seen; use at least {smallest}")
    # The trainer counts each character once plus its `</w>` form if it ends a piece; we add the missing forms.
    trainer_size = vocab_size - len(SPECIAL_TOKENS) - (len(alphabet) - len(word_final))
    bpe = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    trainer = trainers.BpeTrainer(vocab_size=trainer_size, min_frequency=min_frequency, show_progress=False,
                                  end_of_word_suffix=END_OF_WORD)
    bpe.train_from_iterator((" ".join([piece] * count) for piece, count in pieces.items()), trainer)
    state = json.loads(bpe.to_str())["model"]
    trained_symbols = sorted(state["vocab"], key=state["vocab"].get)
    raw_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]

    # A symbol made by two different merges would let Rust and the reference order merges differently;
    # keep only its first merge (each kept merge then only uses symbols that exist before it).
    made, merges = set(), []
    for a, b in raw_merges:
        if a + b not in made:
            made.add(a + b)
            merges.append((a, b))

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in trained_symbols:
        forms = [symbol + CONTINUATION, symbol] if len(symbol) == 1 else [symbol_token(symbol)]
        for token in forms:
            vocab.setdefault(token, len(vocab))

    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = os.path.join(scratch, "vocab.json"), os.path.join(scratch, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = BlenderbotSmallTokenizer(vocab_file, merges_file, model_max_length=512)  # the model's positions
    if directory is not None:
        tokenizer.save_pretrained(directory)
    return tokenizer
