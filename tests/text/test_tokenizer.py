"""Tokenizer tests: ids, decodes and files against transformers' BlenderbotSmallTokenizer, plus our own reference."""

import json
import random
import warnings

import chitchat_dataset
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BlenderbotSmallTokenizer as HFTokenizer

from bbsmall_jax.text.reference import WORD_RE, word_pieces
from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer
from bbsmall_jax.text.vocab_training import train_tokenizer
from bbsmall_jax.text.word_encoder import _pieces

# transformers encodes ~5k utterances/s on a 2-core machine: all 258k would take about a minute, so the
# parity test checks every distinct word in chunks and then this many whole utterances.
UTTERANCE_SAMPLE = 20_000

ADVERSARIAL = [
    "", " ", "   ", "\t", "\n", "\n\n", " \t\n ", "\r\n", "\u3000", "\xa0\xa0", "\x0b\x0c", "\x85", "\u2028\u2029",
    "Hello\nworld", "hello \nworld", "hello\n world", "\nhello", "hello\n", "hello\n\n\nworld", "a \n \n b",
    "x'\ny", "it's\n", "'\n", "(\n", "hi.\n", "hello!\n?", "new\r\nlines\r\n", "end with newline \n",
    "don't", "I'm", "'quoted'", "''", "rock 'n' roll", "o'clock's", "''''", "'", "it ' s", "y'all'd've",
    "Wait...what?!", "!!!", "???", "(a)", "((x))", ".,!?()", "e.g.", "3.14", "1,000,000", "a.b.c", "!?!?.,",
    "__start__", "__end__", "__unk__", "__null__", "hi__end__there", "__end____start__", "___end___",
    "__end__\n", "\n__start__", "x __end__ __start__ y", "__END__", "__newln__", "__Newln__ x", "__star",
    "__start__hello__end__", "__start", "__en d__", "a__null__b__unk__c", "hi.__end__", "it's__end__'",
    "İstanbul", "İ", "ẞ", "STRASSE straße", "ﬁne ﬂow ﬀ", "ǅemal ǈ ǋ", "ΟΔΟΣ ΑΣ'Α Σ. ΣΑΣ", "ᾼ ŉ Ⅻ",
    "café naïve", "e\u0301 \u0301", "I love 🍕!!", "👍🏽", "👨\u200d👩\u200d👧 family", "🇺🇸", "a😀b", "\u200b",
    "你好，世界！", "こんにちは。", "한국어", "مرحبا", "नमस्ते", "ภาษาไทย",
    "\x00", "a\x00b", "\x01\x02", "a\x1cb", "\x1d", "x\x1e\x1fy", "\ufffe\uffff", "a\x01\nb", "\ud800", "a\udfffb",
    "a" * 1000, "supercalifragilisticexpialidocious" * 20, "ab" * 300, "hello" * 100 + "!" * 50,
    "HeLLo WoRLD", "ALL CAPS SHOUTING", "tabs\tinside\twords", "  leading and trailing  ", "multiple     spaces",
    "</w>", "a</w>b", "@@", "a@@ b", "x@@", "@@@ @@",
]


def chitchat_utterances() -> list[str]:
    return [u["text"] for conv in chitchat_dataset.Dataset().values() for turn in conv["messages"] for u in turn]


@pytest.fixture(scope="module")
def utterances():
    return chitchat_utterances()


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, utterances):
    """A 6,000-token vocabulary trained once on every chitchat utterance."""
    directory = tmp_path_factory.mktemp("chitchat_vocab")
    train_tokenizer(utterances, 6000, directory=directory)
    return directory


@pytest.fixture(scope="module")
def ours(trained_dir):
    return BlenderbotSmallTokenizer.from_pretrained(trained_dir)


@pytest.fixture(scope="module")
def hf(trained_dir):
    return HFTokenizer.from_pretrained(str(trained_dir))


def write_files(directory, vocab, merges, config=None):
    """vocab.json (list -> ids in order, or dict) and merges.txt (lines after the header) in `directory`."""
    vocab = vocab if isinstance(vocab, dict) else {token: i for i, token in enumerate(vocab)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory / "vocab.json", directory / "merges.txt"


# transformers' own test vocabulary: special tokens at odd ids, `__null__` missing, intermediates ("ad@@") missing.
TINY_VOCAB = ["__start__", "adapt", "act", "ap@@", "te", "__end__", "__unk__"]
TINY_MERGES = ["a p", "t e</w>", "ap t</w>", "a d", "ad apt</w>", "a c", "ac t</w>"]


@pytest.fixture()
def tiny_files(tmp_path):
    return write_files(tmp_path, TINY_VOCAB, TINY_MERGES)


def hf_ids(tokenizer, texts):
    return [tokenizer(text)["input_ids"] for text in texts]


# ------------------------------------------------------------------------------------------------ id parity


def test_chitchat_ids_match_transformers(ours, hf, utterances):
    """Every distinct word of all 258k utterances (64 to a text), then whole utterances."""
    words = sorted({word for text in utterances for word in WORD_RE.findall(text)})
    chunks = [" ".join(words[i:i + 64]) for i in range(0, len(words), 64)]
    assert ours(chunks)["input_ids"] == hf(chunks)["input_ids"]
    sample = random.Random(0).sample(utterances, UTTERANCE_SAMPLE)
    assert ours(sample)["input_ids"] == hf(sample)["input_ids"]


def test_adversarial_ids_match_transformers(ours, hf):
    expected = hf_ids(hf, ADVERSARIAL)
    assert [ours(text)["input_ids"] for text in ADVERSARIAL] == expected
    assert ours(ADVERSARIAL)["input_ids"] == expected  # batch path (joined text), with its slow-path fallback
    clean = [t for t in ADVERSARIAL if not set(t) & set("\x00\x01\x1c\x1d\x1e\x1f")]
    assert ours(clean)["input_ids"] == hf_ids(hf, clean)  # batch without any fallback character


def test_tiny_vocabulary_matches_transformers(tiny_files):
    ours, hf = BlenderbotSmallTokenizer(*tiny_files), HFTokenizer(*map(str, tiny_files))
    texts = ADVERSARIAL + ["adapt act apte", "ADAPT __null__ adapted", "tea te apt"]
    assert ours(texts)["input_ids"] == hf_ids(hf, texts)
    assert ours.get_vocab() == hf.get_vocab() and len(ours) == len(hf) and ours.vocab_size == hf.vocab_size
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id")
    assert ours.all_special_ids == hf.all_special_ids


def test_merges_file_read_like_the_reference(tmp_path):
    """CRLF line ends, a blank line, a repeated merge (its last rank counts), no final newline (last line dropped:
    "x y" would make "xy@@", which the vocabulary lacks)."""
    files = write_files(tmp_path, TINY_VOCAB, [])
    lines = ["#version: 0.2"] + TINY_MERGES[:3] + ["", "a p"] + TINY_MERGES[3:] + ["x y"]
    (tmp_path / "merges.txt").write_bytes("\r\n".join(lines).encode())
    ours, hf = BlenderbotSmallTokenizer(*files), HFTokenizer(*map(str, files))
    order = [pair for pair in sorted(hf.bpe_ranks, key=hf.bpe_ranks.get) if len(pair) == 2]  # () for the blank line
    assert sorted(ours.bpe_ranks, key=ours.bpe_ranks.get) == order
    texts = ["adapt act apt apte ad ac", "ADAPTACT", "actact"]
    assert ours(texts)["input_ids"] == hf_ids(hf, texts)


def test_merge_order_that_rust_cannot_follow_falls_back_to_python(tmp_path):
    """With 'ab a' ranked before 'a b', Rust would merge 'ab'+'a' between the two 'a b' merges of 'ababx'."""
    vocab = ["__null__", "__start__", "__end__", "__unk__", "a", "b", "x", "a@@", "b@@", "x@@", "ab@@", "aba@@"]
    files = write_files(tmp_path, vocab, ["ab a", "a b"])
    ours, hf = BlenderbotSmallTokenizer(*files), HFTokenizer(*map(str, files))
    assert not ours._words.rust.exact
    assert ours._words.rust.encode(["ababx"]) != [tuple(ours.encode("ababx"))]
    texts = ["ababx", "abab", "aba ab a b", "xababab"]
    assert ours(texts)["input_ids"] == hf_ids(hf, texts)


def test_added_tokens_with_strip_flags_match_transformers(tmp_path):
    flags = dict(lstrip=False, rstrip=False, single_word=False, normalized=False, special=True)
    added = {str(TINY_VOCAB.index(t)): dict(flags, content=t) for t in ("__start__", "__end__", "__unk__")}
    added["7"] = dict(flags, content="__null__")
    added["8"] = dict(flags, content="<sep here>", lstrip=True, rstrip=True)
    added["9"] = dict(flags, content="zz", single_word=True, special=False)
    write_files(tmp_path, TINY_VOCAB, TINY_MERGES,
                config={"added_tokens_decoder": added, "extra_special_tokens": ["<sep here>"]})
    ours, hf = BlenderbotSmallTokenizer.from_pretrained(tmp_path), HFTokenizer.from_pretrained(str(tmp_path))
    texts = ["adapt<sep here>act", "a  <sep here>  b", "xzzy", "zz act", "act zz", "azz zz", "__end__zz", "zz"]
    assert ours(texts)["input_ids"] == hf_ids(hf, texts)
    assert ours.decode(ours.encode(texts[0]), skip_special_tokens=True) == hf.decode(hf.encode(texts[0]), True)


def test_small_cache_stays_exact(trained_dir, hf, utterances):
    ours = BlenderbotSmallTokenizer.from_pretrained(trained_dir, cache_size=50)
    texts = utterances[:3000]
    assert [ours(texts[i:i + 100])["input_ids"] for i in range(0, 3000, 100)] == \
        [hf(texts[i:i + 100])["input_ids"] for i in range(0, 3000, 100)]


# ------------------------------------------------------------------------------------- fast path vs reference

FRAGMENTS = ["__start__", "__end__", "__unk__", "__null__", "__newln__", "_", "__", "\n", " ", "\t", "'", ".", "!",
             "(", ")", ",", "İ", "ẞ", "Σ", "ﬁ", "ǅ", "\x00", "\x01", "\x1c", "\u3000", "\xa0", "\ud800", "😀", "</w>",
             "@@", "\r\n", "A", "th", "e", "ing"]
TEXTS = st.lists(st.one_of(st.text(max_size=6), st.text(st.characters(codec="ascii"), max_size=6),
                           st.sampled_from(FRAGMENTS)), max_size=12).map("".join)
HYPOTHESIS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYPOTHESIS
@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_fast_path_matches_python_reference(ours, texts):
    expected = [ours._reference.encode(text) for text in texts]
    assert ours(texts)["input_ids"] == expected
    assert [ours.encode(text) for text in texts] == expected


@HYPOTHESIS
@given(text=TEXTS)
def test_random_text_matches_transformers(ours, hf, text):
    assert ours.encode(text) == hf(text)["input_ids"]
    assert ours.tokenize(text) == hf.tokenize(text)


@HYPOTHESIS
@given(text=TEXTS)
def test_one_pass_pre_tokenizer_matches_reference_rules(text):
    for word in WORD_RE.findall(text):
        assert _pieces(word) == word_pieces(word)


# ------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("clean", [False, True, None])
def test_decode_matches_transformers(ours, hf, utterances, skip, clean):
    rng = random.Random(1)
    batches = [ours.encode(t) for t in utterances[:300] + ADVERSARIAL]
    batches += [[rng.randrange(len(ours)) for _ in range(rng.randrange(12))] for _ in range(200)]
    batches += [[1, 5, 2, 0, 0], [3, 3], [2], []]
    for ids in batches:
        assert ours.decode(ids, skip, clean) == hf.decode(ids, skip_special_tokens=skip,
                                                           clean_up_tokenization_spaces=clean)
    assert ours.batch_decode(batches, skip, clean) == hf.batch_decode(batches, skip_special_tokens=skip,
                                                                       clean_up_tokenization_spaces=clean)


def test_decode_accepts_ints_and_arrays(ours, hf):
    ids = ours.encode("don't panic, it's fine!")
    assert ours.decode(np.array(ids)) == hf.decode(ids)
    assert ours.decode(np.array([ids, ids])) == [hf.decode(ids)] * 2
    assert ours.decode(2, skip_special_tokens=True) == hf.decode(2, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    tokens = hf.convert_ids_to_tokens(ids) + ["__END__", "nope@@", "__null__"]
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert ours.batch_decode(ids) == hf.batch_decode(ids)


@pytest.mark.parametrize("ids, error, message", [
    ([5, -1], ValueError, "token id -1 at position 1 is not in the vocabulary"),
    ([6000], ValueError, "token id 6000 at position 0 is not in the vocabulary"),
    ([5, -100], ValueError, "token id -100 at position 1 is not in the vocabulary .*skip_special_tokens=True"),
    ([5, 6.7], TypeError, "token id at position 1 is 6.7, not an integer"),
    (np.array([5.0, 6.0]), TypeError, "token id at position 0 is 5.0, not an integer"),
    (6.7, TypeError, "token id is 6.7, not an integer"),
    ([[5, 6], [7, -3]], ValueError, "token id -3 at position 1"),
])
def test_decode_refuses_ids_outside_the_vocabulary_and_non_integers(ours, ids, error, message):
    with pytest.raises(error, match=message):
        ours.decode(ids)


def test_label_padding_is_dropped_with_skip_special_tokens(ours, hf):
    ids = ours.encode("don't panic, it's fine!")
    labels = ids + [2, -100, -100]
    assert ours.decode(labels, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.batch_decode(np.array([labels]), skip_special_tokens=True) == [hf.decode(ids, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------ the call surface


@pytest.mark.parametrize("kwargs", [
    {}, {"padding": True}, {"padding": "longest"}, {"padding": "max_length", "max_length": 40},
    {"truncation": True, "max_length": 7}, {"max_length": 5}, {"padding": True, "max_length": 5},
    {"padding": "max_length", "truncation": True, "max_length": 9}, {"padding": True, "pad_to_multiple_of": 8},
    {"padding": True, "return_tensors": "np"}, {"padding": "max_length", "max_length": 30, "return_tensors": "np"},
    {"padding": True, "padding_side": "left"}, {"truncation": "only_first", "max_length": 3},
    {"padding": True, "return_attention_mask": False}, {"add_special_tokens": False, "max_length": 6},
])
def test_call_matches_transformers(ours, hf, utterances, kwargs):
    batch = utterances[100:108] + ["", "__start__ hi"]
    for text in (batch, batch[0], [batch[1]]):
        got, want = ours(text, **kwargs), hf(text, **kwargs)
        assert set(got) == set(want)
        for key in want:
            assert type(got[key]) is type(want[key])
            if isinstance(want[key], np.ndarray):
                assert got[key].dtype == want[key].dtype
                np.testing.assert_array_equal(got[key], want[key])
            else:
                assert got[key] == want[key]
    assert ours.encode(batch[0], max_length=4) == hf.encode(batch[0], max_length=4)
    assert ours(batch[0]).input_ids == hf(batch[0]).input_ids


def test_truncation_side_and_model_max_length_from_options(trained_dir, utterances):
    options = {"truncation_side": "left", "model_max_length": 6}
    ours = BlenderbotSmallTokenizer.from_pretrained(trained_dir, **options)
    hf = HFTokenizer.from_pretrained(str(trained_dir), **options)
    texts = utterances[:50]
    for kwargs in ({"truncation": True}, {"padding": "max_length", "truncation": True}, {"max_length": 3}):
        assert ours(texts, **kwargs)["input_ids"] == hf(texts, **kwargs)["input_ids"]


def test_ragged_numpy_output_is_an_error(ours):
    with pytest.raises(ValueError, match="padding"):
        ours(["a b c", "a"], return_tensors="np")


# ------------------------------------------------------------------------------------------------ files


def test_save_then_transformers_loads_same_ids(ours, hf, utterances, tmp_path):
    ours.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json",
                                                       "special_tokens_map.json"}
    reloaded_hf = HFTokenizer.from_pretrained(str(tmp_path))
    reloaded = BlenderbotSmallTokenizer.from_pretrained(tmp_path)
    texts = utterances[:2000] + ADVERSARIAL
    expected = hf(texts)["input_ids"]
    assert reloaded_hf(texts)["input_ids"] == expected
    assert reloaded(texts)["input_ids"] == expected
    assert reloaded_hf.get_vocab() == ours.get_vocab() == reloaded.get_vocab()
    assert reloaded_hf.all_special_ids == ours.all_special_ids


def test_tiny_vocabulary_save_roundtrip(tiny_files, tmp_path):
    ours = BlenderbotSmallTokenizer(*tiny_files, model_max_length=16)
    ours.save_pretrained(tmp_path / "saved")
    hf = HFTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf.get_vocab() == ours.get_vocab() and hf.model_max_length == 16
    assert hf("adapt __null__ act te" * 9, truncation=True)["input_ids"] == \
        ours("adapt __null__ act te" * 9, truncation=True)["input_ids"]


@pytest.mark.parametrize("legacy", [False, True])
def test_loads_what_transformers_saves(tiny_files, tmp_path, legacy):
    HFTokenizer(*map(str, tiny_files), extra_special_tokens=["__sep__"]).save_pretrained(str(tmp_path / "hf"))
    if legacy:  # older saves: no added_tokens_decoder, ids of added tokens in added_tokens.json
        config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
        del config["added_tokens_decoder"]
        (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    ours = BlenderbotSmallTokenizer.from_pretrained(tmp_path / "hf")
    hf = HFTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert ours.get_vocab() == hf.get_vocab() and ours.all_special_ids == hf.all_special_ids
    texts = ["adapt__sep__act __null__", "__sep__", "te __unk__"]
    assert ours(texts)["input_ids"] == hf_ids(hf, texts)
    assert ours.decode(ours.encode(texts[0]), skip_special_tokens=True) == hf.decode(hf.encode(texts[0]), True)


def test_trained_vocabulary_format(trained_dir, utterances):
    vocab = json.loads((trained_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (trained_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert [vocab[t] for t in ("__null__", "__start__", "__end__", "__unk__")] == [0, 1, 2, 3]
    assert len(vocab) <= 6000 and sorted(vocab.values()) == list(range(len(vocab)))
    assert merges[0].startswith("#version") and merges[-1] == ""
    assert all(len(m.split()) == 2 for m in merges[1:-1]) and any(m.endswith("</w>") for m in merges[1:-1])
    characters = {ch for text in utterances[:5000] for ch in text.lower() if not ch.isspace()}
    assert all(ch in vocab and ch + "@@" in vocab for ch in characters)
    assert any(t.endswith("@@") and len(t) > 3 for t in vocab)


def test_train_tokenizer_small_corpus(tmp_path):
    texts = ["Hello there!", "hello, hello\nworld", "it's ÎNFO __end__ time"] * 20
    tokenizer = train_tokenizer(texts, 80, min_frequency=1)
    files = tokenizer.save_pretrained(tmp_path)
    hf = HFTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer(texts)["input_ids"] == hf(texts)["input_ids"] and len(files) == 4
    assert tokenizer.unk_token_id not in sum(tokenizer(texts)["input_ids"], [])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, 10)


# ---------------------------------------------------------------------------------------- conversations


TURNS = ["Hi there! How are you?", "I'm good, thanks.\nYou?", "Not bad at all ", "What's new__end__?"]


@pytest.mark.parametrize("separator", ["\n", "__end__ __start__", " __end__ __start__ "])
def test_conversation_matches_joined_text(ours, hf, separator):
    assert ours.encode_conversation(TURNS, turn_separator=separator) == hf.encode(separator.join(TURNS))
    ids = ours.encode_conversation(TURNS, turn_separator=separator, add_end=True)
    assert ids == hf.encode(separator.join(TURNS)) + [hf.eos_token_id]


@pytest.mark.parametrize("max_length", [1, 3, 10, 17, 25, 40])
@pytest.mark.parametrize("add_end", [False, True])
def test_conversation_drops_oldest_whole_turns(ours, hf, max_length, add_end):
    budget = max_length - add_end
    if budget < 1:
        with pytest.raises(ValueError, match="max_length"):
            ours.encode_conversation(TURNS, max_length=max_length, add_end=add_end)
        return
    ids = ours.encode_conversation(TURNS, max_length=max_length, add_end=add_end)
    suffixes = [hf.encode("\n".join(TURNS[k:])) for k in range(len(TURNS))]
    fitting = [s for s in suffixes if len(s) <= budget]
    expected = fitting[0] if fitting else suffixes[-1][-budget:]
    assert ids == expected + ([hf.eos_token_id] if add_end else [])
    assert len(ids) <= max_length


def test_conversation_bad_input(ours):
    with pytest.raises(ValueError, match="max_length"):
        ours.encode_conversation(TURNS, max_length=1, add_end=True)
    with pytest.raises(ValueError, match="max_length"):
        ours.encode_conversation(TURNS, max_length=0)
    with pytest.raises(TypeError):
        ours.encode_conversation("not a list of turns")
    with pytest.raises(TypeError):
        ours.encode_conversation(["ok", 3])
    assert ours.encode_conversation([]) == []


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [123, None, b"bytes", ["ok", 4], [None], 3.5])
def test_non_string_input_is_a_type_error(ours, bad):
    with pytest.raises(TypeError):
        ours(bad)
    with pytest.raises(TypeError):
        ours.encode(bad)


@pytest.mark.parametrize("kwargs", [{"max_length": 0}, {"truncation": True, "max_length": -3},
                                    {"padding": "max_length", "max_length": 0}])
def test_max_length_too_short_is_a_value_error(ours, kwargs):
    with pytest.raises(ValueError, match="max_length"):
        ours("hello there", **kwargs)


def test_empty_and_whitespace_give_empty_ids(ours, hf):
    for text in ["", " ", "\t\n  \u3000"]:
        assert ours.encode(text) == hf.encode(text) == []
    assert ours(["", "  "])["input_ids"] == [[], []]


def test_merge_missing_from_vocab_names_file_and_line(tmp_path):
    vocab = ["__null__", "__start__", "__end__", "__unk__", "a", "b", "a@@", "b@@", "ab@@"]
    files = write_files(tmp_path, vocab, ["a b", "ab b</w>"])
    with pytest.raises(ValueError, match=r"merges\.txt, line 3: .*'abb'.*vocab\.json"):
        BlenderbotSmallTokenizer(*files)


@pytest.mark.parametrize("merges_text, line", [("t h\nth e</w>\n", 1), ("#version: 0.2\nt h\nthe\n", 3),
                                               ("#version: 0.2\nt h x\n", 2), ("#version: 0.2\n\nt h\n\nh\n", 5)])
def test_malformed_merges_names_file_and_line(tmp_path, merges_text, line):
    write_files(tmp_path, ["__null__", "__start__", "__end__", "__unk__", "t@@", "th@@", "the"], [])
    (tmp_path / "merges.txt").write_text(merges_text)
    with pytest.raises(ValueError, match=rf"merges\.txt, line {line}:"):
        BlenderbotSmallTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")


@pytest.mark.parametrize("vocab_text, line", [('{"a": 0,\n "b": 1,,\n}', 2), ('{"a": 0,\n "b": "one"}', 2),
                                              ('["a", "b"]', None), ('{"a": -1}', 1)])
def test_malformed_vocab_names_file(tmp_path, vocab_text, line):
    write_files(tmp_path, [], [])
    (tmp_path / "vocab.json").write_text(vocab_text)
    where = rf"vocab\.json, line {line}:" if line else r"vocab\.json"
    with pytest.raises(ValueError, match=where):
        BlenderbotSmallTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")


@pytest.mark.parametrize("vocab_text, message", [
    ('{"__null__": 0, "__start__": 1, "__end__": 2, "__unk__": 3, "hello": 5, "how": 5, "are": 6, "you": 6}',
     r"vocab\.json: ids given to several tokens: 5: 'hello', 'how'; 6: 'are', 'you'; each token needs its own id"),
    ('{"__unk__": 0, "a": 1,\n "a": 2}', r"vocab\.json: token 'a' appears twice \(ids 1 and 2\)"),
    ('{"__unk__": 0,\n "x\\ud800": 1}', r"vocab\.json, line 2: token 'x\\ud800' holds a lone surrogate"),
])
def test_ambiguous_vocab_is_refused_naming_the_ids(tmp_path, vocab_text, message):
    write_files(tmp_path, [], [])
    (tmp_path / "vocab.json").write_text(vocab_text)
    with pytest.raises(ValueError, match=message):
        BlenderbotSmallTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_merges_cut_short_warn_with_the_count(trained_dir, tmp_path):
    lines = (trained_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    for name in ("vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((trained_dir / name).read_bytes())
    (tmp_path / "tiny").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole file and transformers' test vocabulary make every token
        BlenderbotSmallTokenizer.from_pretrained(trained_dir)
        BlenderbotSmallTokenizer(*write_files(tmp_path / "tiny", TINY_VOCAB, TINY_MERGES))
    half = len(lines) // 2
    (tmp_path / "merges.txt").write_text("\n".join(lines[:half]) + "\n", encoding="utf-8")
    kept = {"".join(line.split()) for line in lines[1:half] if line}
    dropped = {"".join(line.split()) for line in lines[half:] if line} - kept
    vocab = json.loads((trained_dir / "vocab.json").read_text(encoding="utf-8"))
    expected = sum(token[:-2] in dropped if token.endswith("@@") else token + "</w>" in dropped for token in vocab)
    assert expected > 1000
    with pytest.warns(UserWarning, match=rf"merges\.txt: {expected} of the {len(vocab)} tokens of .*vocab\.json "
                                         "cannot be made by any merge"):
        BlenderbotSmallTokenizer.from_pretrained(tmp_path)


def test_unavailable_hub_id_gives_clear_error():
    with pytest.raises(OSError, match="could not fetch 'not a valid/hub id!!' from the Hugging Face hub"):
        BlenderbotSmallTokenizer.from_pretrained("not a valid/hub id!!")
    with pytest.raises(OSError, match="no-such-dir: no such directory, and not a hub id"):
        BlenderbotSmallTokenizer.from_pretrained("./no-such-dir")
