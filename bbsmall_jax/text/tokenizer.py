"""BlenderbotSmall tokenizer: transformers' interface, ids and decodes (the encoding engine is `word_encoder`)."""

from __future__ import annotations

import os
import warnings

import numpy as np

from bbsmall_jax.atomic import write_atomic
from bbsmall_jax.errors import UsageError, UsageTypeError
from bbsmall_jax.text import batching
from bbsmall_jax.text import reference as ref
from bbsmall_jax.text.reference import AddedToken
from bbsmall_jax.text.word_encoder import WordEncoder, gc_paused

_CONFIG_KEYS = ref.SPECIAL_NAMES + ("extra_special_tokens", "additional_special_tokens", "added_tokens_decoder",
                                 "model_max_length", "clean_up_tokenization_spaces", "padding_side", "truncation_side")
_LARGE_INTEGER = int(1e20)  # transformers reads a larger model_max_length as "no limit"
LABEL_PADDING = -100  # transformers' ignored label id; `decode(..., skip_special_tokens=True)` drops it
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class BlenderbotSmallTokenizer:
    """BlenderbotSmall BPE tokenizer with the interface and the exact output of transformers' slow tokenizer."""

    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, vocab_file, merges_file, bos_token="__start__", eos_token="__end__", unk_token="__unk__",
                 pad_token="__null__", *, extra_special_tokens=None, additional_special_tokens=None,
                 added_tokens_decoder=None, model_max_length=None, clean_up_tokenization_spaces=False,
                 padding_side="right", truncation_side="right", cache_size=1 << 20):
        vocab_file, merges_file = os.fspath(vocab_file), os.fspath(merges_file)
        self.encoder = ref.read_vocab(vocab_file)
        self.decoder = {index: token for token, index in self.encoder.items()}
        merges, merge_lines = ref.read_merges(merges_file)
        self.bpe_ranks = dict(zip(merges, range(len(merges))))  # a repeated merge keeps its last rank
        if unk_token is None:
            raise UsageError("unk_token must be set")
        for name, value in zip(ref.SPECIAL_NAMES, (bos_token, eos_token, unk_token, pad_token)):
            setattr(self, name, None if value is None else AddedToken.coerce(value).content)
        extra = extra_special_tokens or additional_special_tokens or []
        extra = [AddedToken.coerce(t).content for t in (extra.values() if isinstance(extra, dict) else extra)]
        named = [getattr(self, name) for name in ref.SPECIAL_NAMES if getattr(self, name)]
        self.all_special_tokens = list(dict.fromkeys(named + extra))
        self._init_added_tokens(added_tokens_decoder or {})
        unk_id = self.encoder.get(self.unk_token, self._added_ids[self.unk_token])
        self._reference = ref.ReferenceTokenizer(self.encoder, self.bpe_ranks, self._added, self._added_ids, unk_id)
        self._check_merges(merges, merge_lines, vocab_file, merges_file)
        self._check_coverage(merges, vocab_file, merges_file)

        self._words = WordEncoder(self._reference, self.bpe_ranks, self._added, self._added_ids, self.encoder, unk_id,
                                  cache_size)
        self.model_max_length = model_max_length if model_max_length and model_max_length <= _LARGE_INTEGER else None
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.padding_side, self.truncation_side = padding_side, truncation_side

    def _init_added_tokens(self, added_tokens_decoder) -> None:
        """Register added tokens; special tokens missing from vocab.json get the next ids, as in transformers."""
        by_id = {int(index): AddedToken.coerce(token) for index, token in added_tokens_decoder.items()}
        vocab = dict(self.encoder, **{token.content: index for index, token in by_id.items()})
        next_id = len(vocab)
        for content in self.all_special_tokens:
            if content in {token.content for token in by_id.values()}:
                continue
            if content not in vocab:
                vocab[content], next_id = next_id, next_id + 1
            by_id[vocab[content]] = AddedToken(content)
        self._added = {token.content: token for token in by_id.values()}
        self._added_ids = {token.content: index for index, token in by_id.items()}
        self._added_decoder = {index: token.content for index, token in by_id.items()}

    def _check_merges(self, merges, lines, vocab_file, merges_file) -> None:
        """Raise if a merge makes a token that vocab.json lacks, unless a later merge consumes that symbol.

        Intermediate symbols that later merges always absorb may be missing (transformers' own test
        vocabulary has some); a symbol no later merge uses must be a token, or the two files disagree.
        """
        last_use: dict[str, int] = {}
        for rank, (a, b) in enumerate(merges):
            last_use[a] = last_use[b] = rank
        for rank, ((a, b), line) in enumerate(zip(merges, lines)):
            symbol = a + b
            token = ref.symbol_token(symbol)
            if last_use.get(symbol, -1) <= rank and token not in self._added_ids and token.lower() not in self.encoder:
                raise UsageError(f"{merges_file}, line {line}: merge {a!r} + {b!r} makes token {token!r}, "
                                 f"which {vocab_file} does not contain (vocab and merges disagree)")

    def _check_coverage(self, merges, vocab_file, merges_file) -> None:
        """Warn when vocab.json holds tokens that no merge makes: merges.txt is cut short or from another vocabulary.

        Symbols of one character need no merge; added tokens are matched before BPE.
        """
        made = {a + b for a, b in merges}
        symbols = {token: ref.token_symbol(token) for token in self.encoder if token not in self._added_ids}
        unreachable = [token for token, symbol in symbols.items()
                       if len(symbol.removesuffix(ref.END_OF_WORD)) > 1 and symbol not in made]
        if unreachable:
            warnings.warn(f"{merges_file}: {len(unreachable)} of the {len(self.encoder)} tokens of {vocab_file} "
                          f"cannot be made by any merge (such as {unreachable[0]!r}): merges.txt may be cut short "
                          "or belong to another vocabulary, and text will not tokenize as the model was trained",
                          UserWarning, stacklevel=3)

    # ----------------------------------------------------------------------------------------------- files

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> BlenderbotSmallTokenizer:
        """Load from a directory with vocab.json + merges.txt (+ config files), or from a Hugging Face Hub id."""
        from bbsmall_jax.hub import resolve_directory

        files = [ref.VOCAB_FILE, ref.MERGES_FILE, ref.CONFIG_FILE, ref.SPECIAL_TOKENS_FILE, ref.ADDED_TOKENS_FILE]
        directory = resolve_directory(name_or_path, allow_patterns=files)
        config = ref.read_config(directory)
        options = {k: config[k] for k in _CONFIG_KEYS if k in config}
        options.update(kwargs)
        return cls(os.path.join(directory, ref.VOCAB_FILE), os.path.join(directory, ref.MERGES_FILE), **options)

    def save_pretrained(self, directory) -> tuple[str, ...]:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (transformers reads them)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        special = {name: getattr(self, name) for name in ref.SPECIAL_NAMES if getattr(self, name) is not None}
        extra = [t for t in self.all_special_tokens if t not in special.values()]
        special.update({"extra_special_tokens": extra} if extra else {})
        added = {str(i): self._added[c].to_json() for i, c in sorted(self._added_decoder.items())}
        config = dict(special, tokenizer_class=type(self).__name__, added_tokens_decoder=added,
                      clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
                      padding_side=self.padding_side, truncation_side=self.truncation_side)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        merges = "".join(f"{a} {b}\n" for a, b in sorted(self.bpe_ranks, key=self.bpe_ranks.get))
        contents = {ref.VOCAB_FILE: ref.to_json(self.encoder), ref.MERGES_FILE: "#version: 0.2\n" + merges,
                    ref.CONFIG_FILE: ref.to_json(config), ref.SPECIAL_TOKENS_FILE: ref.to_json(special)}
        return tuple(write_atomic(os.path.join(directory, name), text) for name, text in contents.items())

    # ------------------------------------------------------------------------------------------ public calls

    def __call__(self, text, padding=False, truncation=None, max_length=None, return_tensors=None, *,
                 pad_to_multiple_of=None, padding_side=None, return_attention_mask=True,
                 add_special_tokens=True) -> batching.BatchEncoding:
        """`input_ids` and `attention_mask` of a str or a list of str, with transformers' padding/truncation rules.

        `add_special_tokens` is accepted for compatibility: BlenderbotSmall adds no tokens around a sequence.
        """
        batched = isinstance(text, (list, tuple))
        if not batched and not isinstance(text, str):
            raise UsageTypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        if return_tensors not in (None, "np"):
            raise UsageError(f"return_tensors must be None or 'np', got {return_tensors!r}")
        padding, truncate, max_length = batching.resolve(padding, truncation, max_length, self.model_max_length,
                                                          self.pad_token_id)
        left = (padding_side or self.padding_side) == "left"
        with gc_paused():
            ids = self._words.encode_texts(list(text) if batched else [text])
            if truncate:
                keep = slice(-max_length, None) if self.truncation_side == "left" else slice(max_length)
                ids = [row[keep] if len(row) > max_length else row for row in ids]
            target = None
            if padding and ids:
                target = max(map(len, ids)) if padding == "longest" else max_length
                if pad_to_multiple_of and target % pad_to_multiple_of:
                    target += pad_to_multiple_of - target % pad_to_multiple_of
            convert = batching.to_numpy if return_tensors else batching.to_lists
            out = convert(ids, target, left, self.pad_token_id)
        if not return_attention_mask:
            del out["attention_mask"]
        return out if batched or return_tensors else batching.BatchEncoding({k: v[0] for k, v in out.items()})

    def encode(self, text, *, padding=False, truncation=None, max_length=None, add_special_tokens=True) -> list:
        """Ids of a str (a list of id lists for a list of str); the options are `__call__`'s."""
        return self(text, padding=padding, truncation=truncation, max_length=max_length,
                    return_attention_mask=False)["input_ids"]

    def tokenize(self, text: str) -> list[str]:
        """Token strings of a text (plain-Python path)."""
        if not isinstance(text, str):
            raise UsageTypeError(f"text must be a str, got {type(text).__name__}")
        return self._reference.tokenize(text)

    def encode_conversation(self, turns, max_length: int = 512, turn_separator: str = "\n",
                            add_end: bool = False) -> list[int]:
        """Model input for a dialogue history: the ids of `turn_separator.join(kept_turns)` (+ `__end__` if add_end).

        Whole turns are dropped from the left until the rest fits `max_length`; if the last turn alone is too
        long, its last tokens are kept. "\\n" (ParlAI, becomes `__newln__`) is the default separator; the API
        page's examples use "__end__ __start__". The separator must end in whitespace or an added token, so
        that each turn tokenizes the same alone as inside the joined text.
        """
        if isinstance(turns, str) or not all(isinstance(t, str) for t in turns):
            raise UsageTypeError("turns must be a list of str")
        if not turn_separator or (ref.WORD_RE.match(turn_separator[-1]) and not any(
                turn_separator.endswith(t) for t in self._added)):
            raise UsageError(f"turn_separator {turn_separator!r} must end in whitespace or an added token")
        budget = max_length - (1 if add_end else 0)
        if budget < 1:
            raise UsageError(f"max_length={max_length} leaves no room for the conversation")
        kept: list[int] = []
        for ids in reversed(self._words.encode_texts([turn + turn_separator for turn in turns[:-1]] + list(turns[-1:]))):
            if len(kept) + len(ids) > budget:
                kept = kept or ids[-budget:]
                break
            kept = ids + kept
        return kept + [self.eos_token_id] if add_end else kept

    # -------------------------------------------------------------------------------------------- decoding

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        """Text of ids (a list of texts for a batch of sequences), joined and cleaned up as transformers does.

        Unlike transformers, an id outside the vocabulary (-1, -100, vocab size) is a ValueError and a
        value that is not an integer (6.7) a TypeError, instead of `__unk__` or a silent `int()`;
        `skip_special_tokens=True` also drops -100, transformers' label padding.
        """
        token_ids = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in token_ids]
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        text = " ".join([tokens] if isinstance(tokens, str) else tokens).replace(ref.CONTINUATION + " ", "").strip()
        if self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None) -> list[str]:
        """Texts of a batch of id sequences."""
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        if sequences and not isinstance(sequences[0], (list, tuple)):  # one sequence, as transformers allows
            return [self.decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)]
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """Token string of an id, or of each id in a list (special ones dropped if asked; a lone id never is).

        An id that is not an integer, or not in the vocabulary, raises naming it; with `skip_special_tokens`
        the label padding -100 is dropped like the special tokens.
        """
        if not isinstance(ids, (list, tuple)):
            return self._token_of(_as_id(ids, None), None)
        skip = set(self.all_special_ids) | {LABEL_PADDING} if skip_special_tokens else ()
        tokens = []
        for position, index in enumerate(ids):
            index = _as_id(index, position)
            if index not in skip:
                tokens.append(self._token_of(index, position))
        return tokens

    def _token_of(self, index: int, position) -> str:
        """The token of one id; ValueError naming the id (and its position in a sequence) outside the vocabulary."""
        token = self._added_decoder.get(index) or self.decoder.get(index)
        if token is None:
            where = "" if position is None else f" at position {position}"
            hint = " (-100 is label padding: decode with skip_special_tokens=True to drop it)" \
                if index == LABEL_PADDING else ""
            raise UsageError(f"token id {index}{where} is not in the vocabulary{hint}")
        return token

    def convert_tokens_to_ids(self, tokens):
        """Id of a token string, or of each one in a list."""
        if isinstance(tokens, str):
            return self._reference.token_id(tokens)
        return [self._reference.token_id(token) for token in tokens]

    # ------------------------------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of entries in vocab.json (added tokens not counted, as in transformers)."""
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.get_vocab())

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return dict(self.encoder, **self._added_ids)

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def _token_id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token_id = property(lambda self: self._token_id_or_none(self.bos_token))
    eos_token_id = property(lambda self: self._token_id_or_none(self.eos_token))
    unk_token_id = property(lambda self: self._token_id_or_none(self.unk_token))
    pad_token_id = property(lambda self: self._token_id_or_none(self.pad_token))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, merges={len(self.bpe_ranks)})"


def _as_id(index, position) -> int:
    """An id as a Python int; TypeError naming a value that is not an integer."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        where = "" if position is None else f" at position {position}"
        raise UsageTypeError(f"token id{where} is {index!r}, not an integer")
    return int(index)
