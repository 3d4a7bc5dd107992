"""Plain-Python BlenderbotSmall tokenization following transformers' slow tokenizer step by step, and its files."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from bbsmall_jax.errors import UsageError, UsageTypeError
from bbsmall_jax.jsonfiles import read_json_object

# Unicode White_Space, which is what `\s` means in the `regex` module transformers uses.
# The stdlib's `\s` (and str.split) also treat U+001C..U+001F as whitespace; the reference does not.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
WORD_RE = re.compile(f"[^{WHITESPACE}]+\n?")
SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates are not UTF-8: Rust (`tokenizers`) cannot take them
VOCAB_FILE, MERGES_FILE, CONFIG_FILE = "vocab.json", "merges.txt", "tokenizer_config.json"
SPECIAL_TOKENS_FILE, ADDED_TOKENS_FILE = "special_tokens_map.json", "added_tokens.json"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order for new ids
END_OF_WORD = "</w>"
CONTINUATION = "@@"
NEWLINE_TOKEN = "__newln__"

_PUNCTUATION_RE = re.compile(r"([.,!?()])")
_SPACE_RUN_RE = re.compile(f"[{WHITESPACE}]{{2,}}")


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in the text before BPE (transformers' AddedToken fields)."""

    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False
    special: bool = True

    @classmethod
    def coerce(cls, value) -> AddedToken:
        """An AddedToken from a str, a transformers-style dict or an AddedToken."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**{k: v for k, v in value.items() if k != "__type"})
        if isinstance(value, str):
            return cls(value)
        raise UsageTypeError(f"special tokens must be str or dict, got {type(value).__name__}")

    def to_json(self) -> dict:
        """The dict transformers writes in `added_tokens_decoder`."""
        return {
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": self.normalized,
            "rstrip": self.rstrip,
            "single_word": self.single_word,
            "special": self.special,
        }


class _Pairs(list):
    """A JSON object's (key, value) pairs in file order, duplicates kept."""


def _line_of(text: str, token: str) -> int:
    return text[: text.find(json.dumps(token, ensure_ascii=False))].count("\n") + 1


def read_vocab(path: str) -> dict[str, int]:
    """Read vocab.json, raising ValueError that names the file (and line) when it is malformed.

    Each token must appear once, with its own integer id >= 0, and be text (no lone surrogate).
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        pairs = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(pairs, _Pairs):
        raise UsageError(f"{path}: expected a JSON object mapping tokens to ids, got {type(pairs).__name__}")
    vocab: dict[str, int] = {}
    for token, index in pairs:
        if type(index) is not int or index < 0:
            raise UsageError(f"{path}, line {_line_of(text, token)}: id of {token!r} is {index!r}, "
                             "expected an integer >= 0")
        if token in vocab:
            raise UsageError(f"{path}: token {token!r} appears twice (ids {vocab[token]} and {index})")
        if SURROGATE.search(token):
            raise UsageError(f"{path}, line {_line_of(text, token)}: token {token!r} holds a lone surrogate, "
                             "which is not text")
        vocab[token] = index
    shared: dict[int, list[str]] = {}
    for token, index in vocab.items():
        shared.setdefault(index, []).append(token)
    repeated = {index: tokens for index, tokens in shared.items() if len(tokens) > 1}
    if repeated:
        listed = "; ".join(f"{index}: {', '.join(map(repr, tokens[:3]))}" for index, tokens in
                           sorted(repeated.items())[:5])
        raise UsageError(f"{path}: ids given to several tokens: {listed}; each token needs its own id")
    return vocab


def read_merges(path: str) -> tuple[list[tuple[str, str]], list[int]]:
    """Read merges.txt the way the reference does (header and final line skipped) and return merges + line numbers."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if not lines[0].startswith("#"):
        raise UsageError(f"{path}, line 1: expected a '#version' header line, got {lines[0]!r}")
    merges, numbers = [], []
    for number, line in enumerate(lines[1:-1], start=2):  # like the reference, the text after the last "\n" is ignored
        parts = line.split()
        if not parts:  # a blank line merges nothing, for the reference too
            continue
        if len(parts) != 2:
            raise UsageError(f"{path}, line {number}: expected two space-separated symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
        numbers.append(number)
    return merges, numbers


def read_config(directory: str) -> dict:
    """Options from tokenizer_config.json; older saves also keep special_tokens_map.json and added_tokens.json."""
    config = _read_json(os.path.join(directory, CONFIG_FILE))
    if "added_tokens_decoder" not in config:
        config.update(_read_json(os.path.join(directory, SPECIAL_TOKENS_FILE)))
        specials = {AddedToken.coerce(config[k]).content for k in SPECIAL_NAMES if config.get(k)}
        added = _read_json(os.path.join(directory, ADDED_TOKENS_FILE))
        config["added_tokens_decoder"] = {i: AddedToken(t, special=t in specials) for t, i in added.items()}
    return config


def _read_json(path: str) -> dict:
    """A JSON file's object, {} when the file does not exist."""
    return read_json_object(path) if os.path.exists(path) else {}


def to_json(obj) -> str:
    """JSON text as transformers writes it (sorted keys, indent 2, UTF-8 kept)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def word_pieces(word: str) -> list[str]:
    """Split one `\\S+\\n?` word into lowercased BPE pieces: punctuation, apostrophes, newline."""
    word = _PUNCTUATION_RE.sub(r" \1", word)
    word = word.replace("'", " ' ")
    word = _SPACE_RUN_RE.sub(" ", word)  # also swallows a newline right after an apostrophe
    word = word.replace("\n", " " + NEWLINE_TOKEN)
    return [piece.lower() for piece in word.split(" ") if piece]


def bpe_symbols(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the characters of `piece` (last one suffixed `</w>`), lowest-ranked pair first, all occurrences at once."""
    word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
    while len(word) > 1:
        first, second = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, float("inf")))
        if (first, second) not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def symbol_token(symbol: str) -> str:
    """vocab.json string of a symbol ending a piece (`</w>` dropped) or, without `</w>`, continuing one (`@@`)."""
    return symbol[: -len(END_OF_WORD)] if symbol.endswith(END_OF_WORD) else symbol + CONTINUATION


def token_symbol(token: str) -> str:
    """The BPE symbol a vocab.json string stands for: `x@@` is `x` inside a piece, `x` is `x</w>` ending one."""
    if token.endswith(CONTINUATION) and len(token) > len(CONTINUATION):
        return token[: -len(CONTINUATION)]
    return token + END_OF_WORD


def symbols_to_tokens(symbols: list[str]) -> list[str]:
    """Vocabulary strings of a merged piece: `@@` on every symbol but the last, `</w>` dropped from the last."""
    return [s + CONTINUATION for s in symbols[:-1]] + [symbols[-1][: -len(END_OF_WORD)]]


def special_token_pattern(contents) -> re.Pattern | None:
    """Leftmost-longest matcher for added tokens (what transformers' Trie finds), or None without any."""
    contents = sorted({c for c in contents if c}, key=len, reverse=True)
    if not contents:
        return None
    return re.compile("(" + "|".join(map(re.escape, contents)) + ")")


def split_added_tokens(text: str, pattern: re.Pattern | None, added: dict[str, AddedToken]) -> list[tuple[str, bool]]:
    """Cut text on added tokens and apply their lstrip/rstrip/single_word flags; yields (segment, is_added)."""
    parts = [part for part in pattern.split(text) if part] if pattern is not None else [text]
    for i, part in enumerate(parts):
        token = added.get(part)
        if token is None:
            continue
        left = parts[i - 1] if i > 0 else None
        right = parts[i + 1] if i + 1 < len(parts) else None
        if token.rstrip and right:
            parts[i + 1] = right.lstrip()
        if token.lstrip and left:
            parts[i - 1] = left.rstrip()
        if token.single_word:
            if left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
    return [(part, part in added) for part in parts if part]


class ReferenceTokenizer:
    """The slow tokenizer's algorithm in plain Python, over already-parsed vocabulary data."""

    def __init__(self, encoder: dict[str, int], ranks: dict[tuple[str, str], int],
                 added: dict[str, AddedToken], added_ids: dict[str, int], unk_id: int):
        self.encoder, self.ranks, self.added, self.added_ids, self.unk_id = encoder, ranks, added, added_ids, unk_id
        self.pattern = special_token_pattern(added)

    def token_id(self, token: str) -> int:
        """Id of a vocabulary string: added tokens verbatim, others lowercased, unknown ones `__unk__`."""
        if token in self.added_ids:
            return self.added_ids[token]
        return self.encoder.get(token.lower(), self.unk_id)

    def tokenize(self, text: str) -> list[str]:
        """Token strings of `text`, added tokens included as they are."""
        tokens = []
        for segment, is_added in split_added_tokens(text, self.pattern, self.added):
            if is_added:
                tokens.append(segment)
                continue
            for word in WORD_RE.findall(segment):
                for piece in word_pieces(word):
                    tokens.extend(symbols_to_tokens(bpe_symbols(piece, self.ranks)))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Ids of `text`."""
        return [self.token_id(token) for token in self.tokenize(text)]
