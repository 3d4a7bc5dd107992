"""The tokenizer's encoding engine: words -> BPE pieces -> ids, exactly as the reference, with caches."""

from __future__ import annotations

import gc
import re
from contextlib import contextmanager
from itertools import chain

from bbsmall_jax.errors import UsageTypeError
from bbsmall_jax.text import reference as ref

# A batch is joined into one string and cut with str.split(). _TEXT_BREAK stands alone between texts and
# _NEWLINE replaces "\n" (plus a space) so that "word\n" stays one word, as `\S+\n?` finds it. Both are
# control characters below U+0100, so ASCII text keeps one byte per character; texts holding them, or the
# characters str.split() treats as whitespace but the reference does not, take the regex path instead.
_TEXT_BREAK, _NEWLINE = "\x00", "\x01"
_SPLIT_UNSAFE = "\x1c\x1d\x1e\x1f" + _NEWLINE
_SPACING = tuple((ch, " " + ch) for ch in ".,!?()") + (("'", " ' "),)  # the reference's two re.sub calls
_SPACED = str.maketrans(dict(_SPACING))
_HAS_SPACE = re.compile(f"[{ref.WHITESPACE}\x1c-\x1f]")
_UNK_SYMBOL = " unknown character "  # holds spaces, so no merges.txt symbol can equal it



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


class RustBPE:
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
def gc_paused():
    """Switch the cyclic garbage collector off for a block (encoding makes many small acyclic lists)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class WordEncoder:
    """Texts -> ids through per-word and per-piece caches, new pieces through the Rust BPE in one call."""

    def __init__(self, reference: ref.ReferenceTokenizer, ranks: dict, added: dict, added_ids: dict,
                 vocab: dict, unk_id: int, cache_size: int):
        self.reference, self.ranks, self.added, self.added_ids = reference, ranks, added, added_ids
        ordered = sorted(ranks, key=ranks.get)
        alphabet = {ch for text in chain(vocab, added_ids, *ordered) for ch in text}
        self.rust = RustBPE(ordered, alphabet, reference.token_id, unk_id)
        self.special_re = ref.special_token_pattern(added)
        # Added tokens without whitespace or strip flags can be cut out word by word, so whole words are cached.
        self.word_level = not any(t.lstrip or t.rstrip or t.single_word or _HAS_SPACE.search(t.content)
                                  for t in added.values())
        self._cache_size = cache_size
        self._split_cache: dict[str, tuple[int, ...]] = {}  # words of joined batches ("\n" written _NEWLINE)
        self._word_cache: dict[str, tuple[int, ...]] = {}  # words as the reference regex finds them
        self._piece_cache: dict[str, tuple[int, ...]] = {}

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text (no padding or truncation)."""
        try:
            joined = f" {_TEXT_BREAK} ".join(texts)
        except TypeError:
            bad = next(i for i, text in enumerate(texts) if not isinstance(text, str))
            raise UsageTypeError(
                f"text must be a str or a list of str; item {bad} is {type(texts[bad]).__name__}") from None
        if not self.word_level:
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
        for segment, is_added in ref.split_added_tokens(text, self.special_re, self.added):
            ids.extend([self.added_ids[segment]] if is_added else
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
        if self.special_re is not None and self.special_re.search(joined):
            odd.update(w for w in words if self.special_re.search(w))
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
        if not self.word_level or self.special_re is None or not self.special_re.search(word):
            return _pieces(word)
        items = []
        for part in filter(None, self.special_re.split(word)):
            if part in self.added_ids:
                items.append(self.added_ids[part])
            else:
                items.extend(piece for w in ref.WORD_RE.findall(part) for piece in _pieces(w))
        return items

    def _encode_pieces(self, pieces: set[str]) -> None:
        """Put the ids of new pieces into the piece cache (Python BPE where Rust cannot match the reference)."""
        new = [p for p in pieces if p not in self._piece_cache]
        rust = [p for p in new if not ref.SURROGATE.search(p)] if self.rust.exact else []
        self._piece_cache.update(zip(rust, self.rust.encode(rust) if rust else ()))
        token_id, ranks = self.reference.token_id, self.ranks
        for piece in set(new).difference(rust):
            self._piece_cache[piece] = tuple(map(token_id, ref.symbols_to_tokens(ref.bpe_symbols(piece, ranks))))
