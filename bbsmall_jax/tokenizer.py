"""BlenderbotSmall tokenizer: transformers' ids and decodes, BPE in Rust (`tokenizers`), a per-word cache."""

from __future__ import annotations

import gc
import os
import re
from contextlib import contextmanager
from itertools import chain

import numpy as np

from bbsmall_jax import tokenizer_reference as ref
from bbsmall_jax.tokenizer_reference import AddedToken

_CONFIG_KEYS = ref.SPECIAL_NAMES + ("extra_special_tokens", "additional_special_tokens", "added_tokens_decoder",
                                 "model_max_length", "clean_up_tokenization_spaces", "padding_side", "truncation_side")
_LARGE_INTEGER = int(1e20)  # transformers reads a larger model_max_length as "no limit"
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

# A batch is joined into one string and cut with str.split(). _TEXT_BREAK stands alone between texts and
# _NEWLINE replaces "\n" (plus a space) so that "word\n" stays one word, as `\S+\n?` finds it. Both are
# control characters below U+0100, so ASCII text keeps one byte per character; texts holding them, or the
# characters str.split() treats as whitespace but the reference does not, take the regex path instead.
_TEXT_BREAK, _NEWLINE = "\x00", "\x01"
_SPLIT_UNSAFE = "\x1c\x1d\x1e\x1f" + _NEWLINE
_SPACING = tuple((ch, " " + ch) for ch in ".,!?()") + (("'", " ' "),)  # the reference's two re.sub calls
_SPACED = str.maketrans(dict(_SPACING))
_SURROGATE = re.compile("[\ud800-\udfff]")  # cannot cross into Rust; such pieces use the Python BPE
_HAS_SPACE = re.compile(f"[{ref.WHITESPACE}\x1c-\x1f]")
_UNK_SYMBOL = " unknown character "  # holds spaces, so no merges.txt symbol can equal it


class BatchEncoding(dict):
    """`input_ids` / `attention_mask` dict that also allows attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _pieces(word: str) -> list[str]:
    """`word_pieces` in one pass: a space before .,!?() and around ', lowercase, final newline -> __newln__.

    Lowercasing the whole word equals lowercasing each piece because spaces end Greek final-sigma contexts.
    The reference's whitespace collapse only matters for an apostrophe before the newline: it drops the newline.
    """
    newline = word[-1] == "\n"
    if newline:
        word = word[:-1]
    pieces = [piece for piece in word.translate(_SPACED).lower().split(" ") if piece]
    if newline and word[-1:] != "'":
        pieces.append(ref.NEWLINE_TOKEN)
    return pieces


class _RustBPE:
    """The merges as a `tokenizers` BPE model over symbol strings, plus symbol -> output id maps."""

    def __init__(self, merges: list[tuple[str, str]], alphabet, token_id, unk_id: int):
        from tokenizers.models import BPE

        symbols: dict[str, int] = {}
        for a, b in merges:
            for s in (a, b, a + b):
                symbols.setdefault(s, len(symbols))
        for ch in alphabet:
            symbols.setdefault(ch, len(symbols))
            symbols.setdefault(ch + ref.END_OF_WORD, len(symbols))
        symbols[_UNK_SYMBOL] = len(symbols)
        self._model = BPE(vocab=symbols, merges=merges, unk_token=_UNK_SYMBOL, end_of_word_suffix=ref.END_OF_WORD,
                          fuse_unk=False)
        # As in the reference: a symbol inside a piece becomes "symbol@@", the last one loses its "</w>".
        self._inner = [token_id(s + ref.CONTINUATION) for s in symbols]
        self._last = [token_id(s[: -len(ref.END_OF_WORD)]) for s in symbols]
        self._inner[-1] = self._last[-1] = unk_id
        # The reference merges every occurrence of the best pair before choosing again; Rust merges one
        # occurrence at a time. They agree unless a merge can create a pair ranked before itself, which
        # needs a symbol that a later merge produces again.
        produced = {a + b: rank for rank, (a, b) in enumerate(merges)}
        self.exact = all(max(produced.get(a, -1), produced.get(b, -1)) <= rank for rank, (a, b) in enumerate(merges))

    def encode(self, pieces: list[str]) -> list[tuple[int, ...]]:
        """Output ids of each piece."""
        tokenize, inner, last = self._model.tokenize, self._inner, self._last
        out = []
        for piece in pieces:
            ids = [token.id for token in tokenize(piece)]
            out.append(tuple([inner[i] for i in ids[:-1]] + [last[ids[-1]]]))
        return out


@contextmanager
def _gc_paused():
    """Switch the cyclic garbage collector off for a block (encoding makes many small acyclic lists)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
            raise ValueError("unk_token must be set")
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

        ordered = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
        alphabet = {ch for text in chain(self.encoder, self._added_ids, *ordered) for ch in text}
        self._rust = _RustBPE(ordered, alphabet, self._reference.token_id, unk_id)
        self._special_re = ref.special_token_pattern(self._added)
        # Added tokens without whitespace or strip flags can be cut out word by word, so whole words are cached.
        self._word_level = not any(t.lstrip or t.rstrip or t.single_word or _HAS_SPACE.search(t.content)
                                   for t in self._added.values())
        self.model_max_length = model_max_length if model_max_length and model_max_length <= _LARGE_INTEGER else None
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self._cache_size = cache_size
        self._split_cache: dict[str, tuple[int, ...]] = {}  # words of joined batches ("\n" written _NEWLINE)
        self._word_cache: dict[str, tuple[int, ...]] = {}  # words as the reference regex finds them
        self._piece_cache: dict[str, tuple[int, ...]] = {}

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
                raise ValueError(f"{merges_file}, line {line}: merge {a!r} + {b!r} makes token {token!r}, "
                                 f"which {vocab_file} does not contain (vocab and merges disagree)")

    # ----------------------------------------------------------------------------------------------- files

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> BlenderbotSmallTokenizer:
        """Load from a directory with vocab.json + merges.txt (+ config files), or from a Hugging Face Hub id."""
        directory = os.fspath(name_or_path)
        if not os.path.isdir(directory):
            directory = _download(directory)
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
        for name, text in contents.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(text)
        return tuple(os.path.join(directory, name) for name in contents)

    # -------------------------------------------------------------------------------------------- encoding

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text (no padding or truncation)."""
        try:
            joined = f" {_TEXT_BREAK} ".join(texts)
        except TypeError:
            bad = next(i for i, text in enumerate(texts) if not isinstance(text, str))
            raise TypeError(f"text must be a str or a list of str; item {bad} is {type(texts[bad]).__name__}") from None
        if not self._word_level:
            return [self._encode_segments(text) for text in texts]
        if joined.count(_TEXT_BREAK) != len(texts) - 1 or any(ch in joined for ch in _SPLIT_UNSAFE):
            return [self._ids_of_words(ref.WORD_RE.findall(text), self._word_cache) for text in texts]
        if "\n" in joined:
            joined = joined.replace("\n", _NEWLINE + " ")
        flat = self._ids_of_words(joined.split(), self._split_cache)
        rows, start = [], 0
        for _ in range(len(texts) - 1):
            end = flat.index(-1, start)  # the id of _TEXT_BREAK (vocab ids are >= 0)
            rows.append(flat[start:end])
            start = end + 1
        rows.append(flat[start:])
        return rows

    def _encode_segments(self, text: str) -> list[int]:
        """Ids when an added token strips whitespace or holds some: cut the whole text on added tokens first."""
        ids = []
        for segment, is_added in ref.split_added_tokens(text, self._special_re, self._added):
            ids.extend([self._added_ids[segment]] if is_added else
                       self._ids_of_words(ref.WORD_RE.findall(segment), self._word_cache))
        return ids

    def _ids_of_words(self, words: list[str], cache: dict) -> list[int]:
        """Concatenated ids of words, filling the cache as needed."""
        try:
            return list(chain.from_iterable(map(cache.__getitem__, words)))
        except KeyError:
            self._fill(words, cache)
            return list(chain.from_iterable(map(cache.__getitem__, words)))

    def _fill(self, words: list[str], cache: dict) -> None:
        """Cache the ids of the words not cached yet, with one Rust call for all their new pieces."""
        for table in (cache, self._piece_cache):
            if len(table) > self._cache_size:
                table.clear()
        missing = list(set(words).difference(cache))
        plain, plain_items, odd, odd_raw = [], [], missing, missing
        if cache is self._split_cache:
            cache.update({_TEXT_BREAK: (-1,), _NEWLINE: ()})
            plain, plain_items, odd = self._split_word_items([w for w in missing if w not in (_TEXT_BREAK, _NEWLINE)])
            odd_raw = [w[:-1] + "\n" if w[-1] == _NEWLINE else w for w in odd]
        odd_items = list(map(self._word_items, odd_raw))  # pieces (str) and added-token ids (int)
        new_pieces = set(chain.from_iterable(plain_items))
        new_pieces.update(x for parts in odd_items for x in parts if type(x) is str)
        self._encode_pieces(new_pieces)
        get = self._piece_cache.__getitem__
        cache.update(zip(plain, [get(parts[0]) if len(parts) == 1 else tuple(chain.from_iterable(map(get, parts)))
                                 for parts in plain_items]))
        cache.update(zip(odd, [tuple(chain.from_iterable(get(x) if type(x) is str else (x,) for x in parts))
                               for parts in odd_items]))

    def _split_word_items(self, words: list[str]) -> tuple[list[str], list[list[str]], list[str]]:
        """(plain words, their pieces, other words) for words of joined batches, in one pass of str methods.

        These words hold no whitespace, no _TEXT_BREAK and _NEWLINE only at the end, so the pieces of the
        plain ones are what str.split() finds in their joined text once spaced like the reference and
        lowercased. Words with added tokens, or with an apostrophe before the newline, are left to `_word_items`.
        """
        joined = f" {_TEXT_BREAK} ".join(words)
        odd = set()
        if "'" + _NEWLINE in joined:  # the reference drops this newline
            odd.update(w for w in words if w.endswith("'" + _NEWLINE))
        if self._special_re is not None and self._special_re.search(joined):
            odd.update(w for w in words if self._special_re.search(w))
        if odd:
            words = [w for w in words if w not in odd]
            joined = f" {_TEXT_BREAK} ".join(words)
        for before, after in _SPACING:
            joined = joined.replace(before, after)
        joined = joined.replace(_NEWLINE, " " + ref.NEWLINE_TOKEN)
        items = [w.split() for w in joined.lower().split(f" {_TEXT_BREAK} ")] if words else []
        return words, items, list(odd)

    def _word_items(self, word: str) -> list:
        """A `\\S+\\n?` word as BPE pieces (str) and, for added tokens inside it, their ids (int)."""
        if not self._word_level or self._special_re is None or not self._special_re.search(word):
            return _pieces(word)
        items = []
        for part in filter(None, self._special_re.split(word)):
            if part in self._added_ids:
                items.append(self._added_ids[part])
            else:
                items.extend(piece for w in ref.WORD_RE.findall(part) for piece in _pieces(w))
        return items

    def _encode_pieces(self, pieces: set[str]) -> None:
        """Put the ids of new pieces into the piece cache (Python BPE where Rust cannot match the reference)."""
        new = [p for p in pieces if p not in self._piece_cache]
        rust = [p for p in new if not _SURROGATE.search(p)] if self._rust.exact else []
        self._piece_cache.update(zip(rust, self._rust.encode(rust) if rust else ()))
        token_id, ranks = self._reference.token_id, self.bpe_ranks
        for piece in set(new).difference(rust):
            self._piece_cache[piece] = tuple(map(token_id, ref.symbols_to_tokens(ref.bpe_symbols(piece, ranks))))

    # ------------------------------------------------------------------------------------------ public calls

    def __call__(self, text, padding=False, truncation=None, max_length=None, return_tensors=None, *,
                 pad_to_multiple_of=None, padding_side=None, return_attention_mask=True,
                 add_special_tokens=True) -> BatchEncoding:
        """`input_ids` and `attention_mask` of a str or a list of str, with transformers' padding/truncation rules.

        `add_special_tokens` is accepted for compatibility: BlenderbotSmall adds no tokens around a sequence.
        """
        batched = isinstance(text, (list, tuple))
        if not batched and not isinstance(text, str):
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be None or 'np', got {return_tensors!r}")
        padding, truncate, max_length = self._strategies(padding, truncation, max_length)
        left = (padding_side or self.padding_side) == "left"
        with _gc_paused():
            ids = self._encode_texts(list(text) if batched else [text])
            if truncate:
                keep = slice(-max_length, None) if self.truncation_side == "left" else slice(max_length)
                ids = [row[keep] if len(row) > max_length else row for row in ids]
            target = None
            if padding and ids:
                target = max(map(len, ids)) if padding == "longest" else max_length
                if pad_to_multiple_of and target % pad_to_multiple_of:
                    target += pad_to_multiple_of - target % pad_to_multiple_of
            out = self._to_numpy(ids, target, left) if return_tensors else self._to_lists(ids, target, left)
        if not return_attention_mask:
            del out["attention_mask"]
        return out if batched or return_tensors else BatchEncoding({k: v[0] for k, v in out.items()})

    def _strategies(self, padding, truncation, max_length):
        """(padding mode, whether to truncate, max_length) with transformers' defaults and checks."""
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers: max_length alone means truncation
        pad_modes = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
        cut_modes = {None: False, False: False, "do_not_truncate": False, "only_second": False,
                     True: True, "longest_first": True, "only_first": True}
        if padding not in pad_modes or truncation not in cut_modes:
            raise ValueError(f"unsupported padding={padding!r} or truncation={truncation!r}")
        padding, truncate = pad_modes[padding], cut_modes[truncation]
        if max_length is None:
            max_length = self.model_max_length
            padding = None if padding == "max_length" and max_length is None else padding
            truncate = truncate and max_length is not None
        if max_length is not None and max_length < 1 and (truncate or padding == "max_length"):
            raise ValueError(f"max_length={max_length} is too short: truncation cannot make a sequence shorter than 1")
        if padding and self.pad_token_id is None:
            raise ValueError("padding needs a pad_token")
        return padding, truncate, max_length

    def _to_lists(self, ids: list[list[int]], target: int | None, left: bool) -> BatchEncoding:
        """Lists of ids and masks, padded to `target` when given."""
        masks = [[1] * len(row) for row in ids]
        if target is not None:
            for rows, fill in ((ids, self.pad_token_id), (masks, 0)):
                for i, row in enumerate(rows):
                    pad = [fill] * (target - len(row))
                    rows[i] = pad + row if left else row + pad
        return BatchEncoding(input_ids=ids, attention_mask=masks)

    def _to_numpy(self, ids: list[list[int]], target: int | None, left: bool) -> BatchEncoding:
        """[batch, length] int64 arrays padded to `target`, filled from the flat ids without per-row copies."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        longest = int(lengths.max(initial=0))
        if target is None and (lengths != longest).any() or target is not None and longest > target:
            raise ValueError("sequences have different lengths; pass padding=True (and truncation) for numpy output")
        width = longest if target is None else target
        positions = np.arange(width)
        mask = positions >= (width - lengths)[:, None] if left else positions < lengths[:, None]
        input_ids = np.full((len(ids), width), self.pad_token_id if target is not None else 0, dtype=np.int64)
        input_ids[mask] = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return BatchEncoding(input_ids=input_ids, attention_mask=mask.astype(np.int64))

    def encode(self, text, *, padding=False, truncation=None, max_length=None, add_special_tokens=True) -> list:
        """Ids of a str (a list of id lists for a list of str); the options are `__call__`'s."""
        return self(text, padding=padding, truncation=truncation, max_length=max_length,
                    return_attention_mask=False)["input_ids"]

    def tokenize(self, text: str) -> list[str]:
        """Token strings of a text (plain-Python path)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
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
            raise TypeError("turns must be a list of str")
        if not turn_separator or (ref.WORD_RE.match(turn_separator[-1]) and not any(
                turn_separator.endswith(t) for t in self._added)):
            raise ValueError(f"turn_separator {turn_separator!r} must end in whitespace or an added token")
        budget = max_length - (1 if add_end else 0)
        if budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for the conversation")
        kept: list[int] = []
        for ids in reversed(self._encode_texts([turn + turn_separator for turn in turns[:-1]] + list(turns[-1:]))):
            if len(kept) + len(ids) > budget:
                kept = kept or ids[-budget:]
                break
            kept = ids + kept
        return kept + [self.eos_token_id] if add_end else kept

    # -------------------------------------------------------------------------------------------- decoding

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        """Text of ids (a list of texts for a batch of sequences), joined and cleaned up as transformers does."""
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
        """Token string of an id, or of each id in a list (special ones dropped if asked; a lone id never is)."""
        if isinstance(ids, (int, np.integer)):
            return self._added_decoder.get(int(ids)) or self.decoder.get(int(ids), self.unk_token)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        added, decoder, unk = self._added_decoder, self.decoder, self.unk_token
        return [added[i] if i in added else decoder.get(i, unk) for i in map(int, ids) if i not in skip]

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


def _download(repo_id: str) -> str:
    """Local snapshot of a Hub repository's tokenizer files."""
    try:
        from huggingface_hub import snapshot_download

        files = [ref.VOCAB_FILE, ref.MERGES_FILE, ref.CONFIG_FILE, ref.SPECIAL_TOKENS_FILE, ref.ADDED_TOKENS_FILE]
        return snapshot_download(repo_id, allow_patterns=files)
    except Exception as e:  # offline, unknown repository, invalid id, package missing: one clear message
        raise OSError(f"cannot load tokenizer {repo_id!r}: it is not a local directory and downloading it from the "
                      f"Hugging Face Hub failed ({type(e).__name__}: {e}). Offline, pass a directory that holds "
                      f"{ref.VOCAB_FILE} and {ref.MERGES_FILE}.") from e
