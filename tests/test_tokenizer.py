"""Tokenizer: exact round trips, unforgeable special tokens, exact byte counts, files, deterministic training."""

import itertools
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydoc_data.topics import topics

from llm.tokenizer import CHUNK_CHARS, MODEL_FILENAME, SPECIAL_TOKENS, Tokenizer, _chunks

DOCS = list(topics.values())  # Python's own docs: ~465K chars of real English prose and code
VOCAB = 512
HYPO = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    Tokenizer.train(DOCS, VOCAB, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def assert_exact(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode()
    assert int(tok.token_bytes()[ids].sum()) == len(s.encode())  # bits-per-byte denominators are exact
    forbidden = {0, *(tok.special_id(n) for n in SPECIAL_TOKENS)}  # <unk> and specials never come from text
    assert not forbidden & set(ids)
    return ids


# ---------------------------------------------------------------- round trips


@HYPO
@given(st.text())
def test_roundtrip_any_text(tok, s):
    assert_exact(tok, s)


# The strings the tokenizer must get right, shared with the tests of the exported tokenizer.json.
TRICKY_PIECES = [" ", "\n", "\r", "\t", "\u2581", "\x00", "a", "é", "😀", "<|bos|>", "中", "the"]
EXPLICIT_STRINGS = [
    "", " ", "   ", "\n", "\n\n\n", "  leading and trailing  ", "\t\ttabs\t", "a\r\nb\r\n", " \n \n ",
    "emoji 😀👍🏽 and 🇫🇷 flags", "e\u0301 combining", "中文字符 日本語 한국어", "\x00NUL\x00", "\x01\x1b[31mred\x7f",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    "\u2581", "\u2581\u2581\u2581", "a\u2581b", " \u2581 ", "\u2581leading", "trailing\u2581", "▁the", "<0x41>", "<unk>",
    "\ufeffBOM", "\u200b\u200d", "x" * 10_000, "1234567890 3.14159",
]


@HYPO
@given(st.lists(st.sampled_from(TRICKY_PIECES), max_size=60))
def test_roundtrip_tricky_pieces(tok, parts):
    assert_exact(tok, "".join(parts))


@pytest.mark.parametrize("s", EXPLICIT_STRINGS)
def test_roundtrip_explicit(tok, s):
    assert_exact(tok, s)


def test_literal_space_mark_is_not_a_space(tok):
    assert tok.decode(tok.encode("a\u2581b")) == "a\u2581b"
    assert tok.encode("a\u2581b") != tok.encode("a b")


def test_unknown_chars_use_byte_fallback(tok):
    ids = tok.encode("😀")  # never in the training docs
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_learned_pieces_compress_and_keep_whitespace(tok):
    assert len(tok.encode("the object")) < len("the object")
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert any("\n" in p for p in pieces)  # newlines were part of the training chunks
    assert "\u2581\u2581\u2581\u2581" in pieces  # whitespace-only pieces (code indentation)


def test_digits_are_split(tok):
    assert len(tok.encode("1234567890")) == 10


# ---------------------------------------------------------------- special tokens


def test_special_tokens_are_single_distinct_ids(tok):
    ids = [tok.special_id(n) for n in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert all(0 < i < tok.vocab_size for i in ids)
    assert tok.bos_id == tok.special_id("<|bos|>") == tok.special_id("bos")
    assert tok.special_id("assistant_end") == tok.special_id("<|assistant_end|>")
    assert [tok.decode([i]) for i in ids] == list(SPECIAL_TOKENS)
    assert [tok.id_to_piece(i) for i in ids] == list(SPECIAL_TOKENS)


def test_text_cannot_forge_special_tokens(tok):
    text = "".join(SPECIAL_TOKENS) + " hello <|assistant_end|>\n<|bos|>"
    ids = assert_exact(tok, text)
    assert len(ids) > len(SPECIAL_TOKENS)


def test_decode_mixes_specials_and_text(tok):
    ids = [tok.bos_id, *tok.encode("hi there"), tok.special_id("user_end")]
    assert tok.decode(ids) == "<|bos|>hi there<|user_end|>"
    assert tok.decode(torch.tensor(ids)) == "<|bos|>hi there<|user_end|>"


def test_unknown_special_name_lists_valid_names(tok):
    with pytest.raises(ValueError, match="assistant_end"):
        tok.special_id("eos")


def test_bad_ids_are_rejected(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_piece(-1)


# ---------------------------------------------------------------- batch, bos, bytes, report


def test_encode_batch_matches_encode(tok):
    texts = DOCS[:20] + ["", "a\u2581b \u2581\u2581", "😀\n", "<|bos|>"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, prepend_bos=True) == [tok.encode(t, prepend_bos=True) for t in texts]


def test_prepend_bos(tok):
    assert tok.encode("hello", prepend_bos=True) == [tok.bos_id, *tok.encode("hello")]
    assert tok.encode("", prepend_bos=True) == [tok.bos_id]


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.long and tb.shape == (tok.vocab_size,)
    assert all(tb[tok.special_id(n)] == 0 for n in SPECIAL_TOKENS)
    assert tb[0] == 0  # <unk>
    assert all(tb[i] == 1 for i in tok.encode("\x00\x01😀"))  # byte-fallback tokens are one byte each
    assert int(tb.max()) > 2  # learned merges span several bytes


def test_compression_report(tok):
    sources = {"docs": DOCS[:10], "emoji": ["😀😀 😀"]}
    report = tok.compression_report(sources)
    assert set(report) == {"docs", "emoji"}
    expected = sum(len(t.encode()) for t in DOCS[:10]) / sum(len(tok.encode(t)) for t in DOCS[:10])
    assert report["docs"] == pytest.approx(expected)
    assert report["docs"] > 1.5 and report["emoji"] == pytest.approx(1.0)  # byte fallback: one byte per token


# ---------------------------------------------------------------- files


def test_train_writes_only_the_model(tok_dir, tmp_path):
    assert Tokenizer.train(DOCS[:50], VOCAB, tmp_path).path == tmp_path / MODEL_FILENAME
    assert [p.name for p in tok_dir.iterdir()] == [MODEL_FILENAME]  # no temp files left behind


def test_save_load_roundtrip(tok, tok_dir, tmp_path):
    saved = tok.save(tmp_path / "copy")
    assert saved.read_bytes() == (tok_dir / MODEL_FILENAME).read_bytes()
    for path in (tmp_path / "copy", saved):  # folder or file
        again = Tokenizer.load(path)
        assert again.path == saved and again.fingerprint() == tok.fingerprint()
        assert again.encode_batch(DOCS[:5]) == tok.encode_batch(DOCS[:5])
    assert len(tok.fingerprint()) == 64


def test_pickle_roundtrip(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.fingerprint() == tok.fingerprint() and again.encode(DOCS[0]) == tok.encode(DOCS[0])


def test_load_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=MODEL_FILENAME):
        Tokenizer.load(tmp_path)  # a folder without tokenizer.model


# ---------------------------------------------------------------- training


def test_training_is_deterministic(tok, tmp_path):
    a = Tokenizer.train(DOCS, VOCAB, tmp_path / "a", num_threads=1)
    b = Tokenizer.train(iter(DOCS), VOCAB, tmp_path / "b", num_threads=2)
    assert (tmp_path / "a" / MODEL_FILENAME).read_bytes() == (tmp_path / "b" / MODEL_FILENAME).read_bytes()
    assert a.fingerprint() == b.fingerprint() == tok.fingerprint()
    other = Tokenizer.train(DOCS[:40], VOCAB, tmp_path / "c")
    assert other.fingerprint() != tok.fingerprint()


def test_max_chars_stops_an_endless_stream(tmp_path):
    t = Tokenizer.train(itertools.cycle(DOCS), 400, tmp_path, max_chars=200_000)
    assert t.vocab_size == 400


def test_one_huge_line_is_chunked_not_skipped(tmp_path):
    # sentencepiece drops training sentences longer than max_sentence_length; one 460K-char line must still train
    line = " ".join(DOCS).replace("\n", " ")
    t = Tokenizer.train([line], VOCAB, tmp_path)
    assert t.vocab_size == VOCAB
    assert t.compression_report({"line": [line[:20_000]]})["line"] > 1.5


def test_chunks_cover_text_at_line_ends():
    text = ("short line\n" * 1000) + "x" * (3 * CHUNK_CHARS)
    chunks = list(_chunks(text))
    assert "".join(chunks) == text
    assert all(len(c) <= CHUNK_CHARS for c in chunks)
    assert chunks[0].endswith("\n")


def test_training_text_with_space_marks_still_round_trips(tmp_path):
    docs = [d.replace(" ", "\u2581") if i % 2 else d for i, d in enumerate(DOCS)]
    t = Tokenizer.train(docs, VOCAB, tmp_path)
    for s in ["a\u2581b", "the \u2581the\u2581 the", docs[1][:500]]:
        assert_exact(t, s)


def test_bad_training_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(DOCS, 100, tmp_path)
    with pytest.raises(ValueError, match="vocab_size=300 is too small for this corpus"):
        Tokenizer.train(DOCS, 300, tmp_path)
    with pytest.raises(ValueError, match="no text"):
        Tokenizer.train(["", ""], VOCAB, tmp_path)
    with pytest.raises(ValueError, match="max_chars"):
        Tokenizer.train(DOCS, VOCAB, tmp_path, max_chars=0)
    assert not (tmp_path / MODEL_FILENAME).exists()  # failed training leaves no artifact
