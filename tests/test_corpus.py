"""The bundled pretraining corpus: present, loadable with `datasets`, real English, clean, unique,
documented, and rebuilt byte for byte by dev/build_corpus.py where its Debian packages exist."""

import gzip
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from llm.data.corpus import CORPUS_DIR, available_sources, corpus_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
import build_corpus  # noqa: E402  (a one-off tool in dev/, not part of the package)

SOURCES = ["devils-dictionary", "jargon-file", "python-docs", "web-bible", "wordnet"]
COMMON_WORDS = set(
    "the of and to a in is that for it as with be on not by this are or from at an which you can if "
    "have was will he his they all but their when one has its so we there been were them more than "
    "into other these may some what would only also no".split()
)


def read_docs(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def docs_by_source() -> dict[str, list[dict]]:
    return {path.name.removesuffix(".jsonl.gz"): read_docs(path) for path in corpus_files()}


def test_every_source_is_bundled_with_its_license():
    assert available_sources() == SOURCES
    for path in corpus_files():
        assert path.is_file() and path.parent == CORPUS_DIR
    for name in SOURCES:
        license_file = CORPUS_DIR / f"LICENSE-{name}"
        assert license_file.stat().st_size > 500, f"{license_file} is missing or empty"
    readme = (CORPUS_DIR / "README.md").read_text(encoding="utf-8")
    for name in SOURCES:
        assert f"{name}.jsonl.gz" in readme and f"LICENSE-{name}" in readme


def test_corpus_files_selects_sources_and_rejects_unknown_ones():
    assert corpus_files(["wordnet", "web-bible"]) == [CORPUS_DIR / "wordnet.jsonl.gz", CORPUS_DIR / "web-bible.jsonl.gz"]
    with pytest.raises(ValueError, match=r"'shakespeare'.*available.*wordnet"):
        corpus_files(["wordnet", "shakespeare"])
    with pytest.raises(ValueError, match="list of names"):
        corpus_files("wordnet")


def test_loads_with_datasets_json_builder(tmp_path):
    import datasets
    files = [str(p) for p in corpus_files(["devils-dictionary", "jargon-file"])]
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(tmp_path))
    assert set(ds.column_names) == {"text", "source"}
    expected = sum(len(read_docs(Path(f))) for f in files)
    assert ds.num_rows == expected
    assert set(ds["source"]) == {"devils-dictionary", "jargon-file"}


def test_every_document_has_text_and_its_files_source(docs_by_source):
    for name, docs in docs_by_source.items():
        assert docs, name
        for doc in docs:
            assert set(doc) == {"text", "source"}
            assert doc["source"] == name
            assert len(doc["text"]) >= build_corpus.MIN_DOC_CHARS
            assert len(doc["text"]) <= build_corpus.MAX_DOC_CHARS


def test_total_size_is_in_the_planned_range(docs_by_source):
    text_bytes = sum(len(d["text"].encode()) for docs in docs_by_source.values() for d in docs)
    gz_bytes = sum(p.stat().st_size for p in corpus_files())
    assert 8e6 <= text_bytes <= 15e6
    assert 2e6 <= gz_bytes <= 5e6


def test_text_is_real_english(docs_by_source):
    for name, docs in docs_by_source.items():
        text = "\n".join(d["text"] for d in docs)
        words = re.findall(r"[A-Za-z]+", text)
        common = sum(w.lower() in COMMON_WORDS for w in words) / len(words)
        assert common > 0.2, f"{name}: only {common:.0%} of words are common English words"
        visible = re.sub(r"\s", "", text)
        letters = sum(c.isascii() and c.isalpha() for c in visible) / len(visible)
        assert letters > 0.85, f"{name}: only {letters:.0%} ASCII letters"


def test_text_is_clean_utf8_without_markup(docs_by_source):
    for name, docs in docs_by_source.items():
        for doc in docs:
            text = doc["text"]
            assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text), name
            assert text == text.strip() and "\n\n\n" not in text, name
            # Sphinx and OSIS markup is gone (Python's docs may still show HTML inside code examples)
            assert "¶" not in text and 'class="' not in text, name
            if name != "python-docs":
                assert not re.search(r"</?(w|note|div|chapter|title|l|lg)\b", text), name


def test_no_duplicate_documents(docs_by_source):
    digests = Counter(hashlib.sha1(d["text"].encode()).hexdigest() for docs in docs_by_source.values() for d in docs)
    assert max(digests.values()) == 1


def test_files_are_shuffled_so_a_prefix_is_a_fair_sample(docs_by_source):
    # Bible chapters are extracted in canonical order; a shuffled file mixes books from the start.
    books = [d["text"].split("\n")[0].rsplit(" ", 1)[0] for d in docs_by_source["web-bible"][:30]]
    assert len(set(books)) >= 10
    heads = [d["text"][:1] for d in docs_by_source["devils-dictionary"][:20]]
    assert heads != sorted(heads)


def test_text_helpers():
    assert build_corpus.clean("a\x07b  \r\n\n\n\nc\u00a0d\t ") == "ab\n\nc d"
    parts = build_corpus.split_long("one two\n\nthree four\n\nfive", max_chars=12)
    assert parts == ["one two", "three four", "five"]
    assert all(len(p) <= 5 for p in build_corpus.split_long("x" * 23, max_chars=5))
    assert build_corpus.group(["aaa", "bbb", "ccc"], max_chars=6) == ["aaa\n\nbbb", "ccc"]


def test_html_and_osis_extraction():
    html = (
        '<h1>Title<a class="headerlink" href="#">¶</a></h1><p>Some\n  soft-wrapped <code>text</code>.</p>'
        "<pre>def f():\n    return 1</pre><h2>Next</h2><table><tr><td><p>a</p></td><td>b</td></tr></table>"
    )
    assert build_corpus.html_sections(html) == [
        "Title\n\nSome soft-wrapped text.\n\ndef f():\n    return 1",
        "Next\n\na | b",
    ]
    osis = '<w lemma="x">God</w><note placement="foot">a note</note><w>created</w> <w>light</w><note>n</note>.'
    assert build_corpus._osis_text(osis) == "God created light."


@pytest.mark.parametrize("name", ["devils-dictionary", "jargon-file"])
def test_rebuild_reproduces_the_bundled_bytes(name, tmp_path):
    source = build_corpus.SOURCES[name][0]
    assert source.license_from.exists(), (
        f"Debian package {source.packages[0]} is missing: bash recipes/setup.sh installs it")
    build_corpus.build(tmp_path, names=[name])
    for file in (f"{name}.jsonl.gz", f"LICENSE-{name}"):
        assert (tmp_path / file).read_bytes() == (CORPUS_DIR / file).read_bytes()
