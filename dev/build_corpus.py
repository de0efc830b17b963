"""Build the bundled pretraining corpus (llm/data/corpus/*.jsonl.gz) from text installed offline.

    apt-get install python3-doc wordnet-base sword-text-web jargon-text dict-devil
    python dev/build_corpus.py            # rewrites llm/data/corpus/

Every source is real, public-domain or permissively licensed English installed by a Debian
package (see corpus/README.md for provenance and licenses). Each source yields coherent
documents (a doc section, a Bible chapter, ~50 WordNet synsets, a run of dictionary entries),
is sampled down to a byte budget and shuffled with a fixed seed, then written as one gzipped
JSON-lines file of {"text", "source"} objects. Same packages in, same bytes out.
"""

import argparse
import gzip
import hashlib
import html
import json
import random
import re
import subprocess
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parents[1] / "llm" / "data" / "corpus"
SEED = 1234
MAX_DOC_CHARS = 20_000
MIN_DOC_CHARS = 200

PY_DOCS = Path("/usr/share/doc/python3.11/html")
WORDNET = Path("/usr/share/wordnet")
WEB_BIBLE = Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb")
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
DEVIL = Path("/usr/share/dictd/devil")


@dataclass(frozen=True)
class Source:
    name: str  # file stem and the "source" field of every document
    packages: tuple[str, ...]  # Debian packages the extractor reads
    budget_bytes: int | None  # UTF-8 bytes kept after shuffling; None keeps everything
    license_from: Path  # written to LICENSE-<name> (an HTML page as text, other files verbatim)


# ----------------------------------------------------------------------------- text helpers

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")


def clean(text: str) -> str:
    """NFC, no control characters but \\n and \\t, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\xa0", " "))
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut at paragraph breaks (then line breaks) so no piece exceeds max_chars."""
    if len(text) <= max_chars:
        return [text]
    for sep in ("\n\n", "\n", " "):
        parts, cur = [], ""
        for para in text.split(sep):
            if cur and len(cur) + len(sep) + len(para) > max_chars:
                parts.append(cur)
                cur = para
            else:
                cur = f"{cur}{sep}{para}" if cur else para
        parts.append(cur)
        if all(len(p) <= max_chars for p in parts):
            return parts
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def group(entries: list[str], max_chars: int, sep: str = "\n\n") -> list[str]:
    """Join consecutive entries into documents of at most ~max_chars."""
    docs, cur = [], []
    for entry in entries:
        if cur and sum(len(e) for e in cur) + len(entry) > max_chars:
            docs.append(sep.join(cur))
            cur = []
        cur.append(entry)
    if cur:
        docs.append(sep.join(cur))
    return docs


# ----------------------------------------------------------------------------- HTML -> text


class _HTMLText(HTMLParser):
    """Sphinx HTML to plain text; starts a new section at every <h1>/<h2>."""

    BLOCK = {"p", "div", "section", "ul", "ol", "dl", "table", "pre", "blockquote", "figure", "hr"}
    LINE = {"li", "dt", "dd", "tr", "br", "caption"}
    SKIP = {"script", "style", "head", "form", "select", "nav"}
    SKIP_CLASSES = ("headerlink", "toctree-wrapper")  # pilcrow links; tables of contents
    VOID = {"br", "hr", "img", "input", "meta", "link", "col", "wbr", "source", "area", "base"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.skip = 0  # depth inside skipped elements
        self.pre = 0
        self.table = 0  # inside a table, cells are joined with " | " and rows end lines
        self.first_cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        cls = dict(attrs).get("class") or ""
        if self.skip or tag in self.SKIP or any(c in cls for c in self.SKIP_CLASSES):
            self.skip += tag not in self.VOID
            return
        if tag in {"h1", "h2"}:
            self.sections.append([])
        if tag in {"td", "th"}:
            self.sections[-1].append("" if self.first_cell else " | ")
            self.first_cell = False
        elif tag == "tr":
            self.sections[-1].append("\n")
            self.first_cell = True
        elif self.table and tag != "table":
            pass  # paragraphs inside cells stay on the row's line
        elif tag in self.BLOCK or tag[:1] == "h" and tag[1:].isdigit():
            self.sections[-1].append("\n\n")
        elif tag in self.LINE:
            self.sections[-1].append("\n")
        self.pre += tag == "pre"
        self.table += tag == "table"

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if self.skip:
            self.skip -= 1
            return
        self.pre -= tag == "pre"
        self.table -= tag == "table"
        if self.table and tag != "table":
            return
        if tag in self.BLOCK or tag[:1] == "h" and tag[1:].isdigit():
            self.sections[-1].append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            # code keeps its layout: protect its newlines and spaces from whitespace folding
            pre = data.replace("\n", "\x02").replace(" ", "\x03")
            self.sections[-1].append(pre if self.pre else re.sub(r"\s+", " ", data))


def html_sections(markup: str) -> list[str]:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    out = []
    for pieces in parser.sections:
        text = re.sub(r"[ \t]*\n[ \t]*(?=\S)", "\n", "".join(pieces))  # drop indentation of soft breaks
        text = re.sub(r" {2,}", " ", re.sub(r" +([.,;:])", r"\1", text)).replace("\x02", "\n").replace("\x03", " ")
        text = clean(text)
        if text:
            out.append(text)
    return out


# ----------------------------------------------------------------------------- extractors


def python_docs() -> Iterator[str]:
    """Python's HTML documentation, one document per top-level section (small ones merged).

    Sphinx soft-wraps paragraphs in the HTML source; the text keeps one line per paragraph,
    code blocks keep their layout.
    """
    # The C API and distutils references are mostly signatures; the changelog is issue titles.
    skip_dirs = {"c-api", "distutils", "_static", "_sources", "_images", "_downloads"}
    pages = [PY_DOCS / "glossary.html"] + sorted(p for p in PY_DOCS.glob("*/*.html") if p.parts[-2] not in skip_dirs)
    for page in pages:
        if page.name == "changelog.html":
            continue
        for text in group(html_sections(_sphinx_body(page)), max_chars=4_000):
            yield from split_long(text)


def _sphinx_body(page: Path) -> str:
    """The page's main column, without navigation bars and sidebar."""
    markup = page.read_text(encoding="utf-8")
    start = markup.index('role="main">') + len('role="main">')
    return markup[start : markup.find('<div class="sphinxsidebar"', start)]


_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet() -> Iterator[str]:
    """WordNet 3.0 synsets rendered as 'lemma, synonym (pos): gloss; "example"', 50 to a document.

    The data files list synsets lexicographer file by lexicographer file (noun.animal,
    verb.motion, ...), so consecutive synsets share a topic and a group of 50 is coherent.
    """
    for pos in ("noun", "verb", "adj", "adv"):
        by_lexfile: dict[int, list[str]] = {}
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # license header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            lexfile, ss_type, n_words = int(fields[1]), fields[2], int(fields[3], 16)
            words = [re.sub(r"\((a|p|ip)\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2]]
            entry = f"{', '.join(words)} ({_WN_POS[ss_type]}): {gloss.strip()}"
            by_lexfile.setdefault(lexfile, []).append(entry)
        for entries in by_lexfile.values():
            for i in range(0, len(entries), 50):
                yield "\n".join(entries[i : i + 50])


def _sword_testament(testament: str) -> str:
    """Raw OSIS of one testament of a SWORD zText module (zlib blocks of whole books or parts).

    The module stores verse boundaries only in its index (.bzv: block, offset, size per verse),
    and many verses end without a space, so the verses are re-joined with one.
    """
    import struct
    import zlib

    blocks = (WEB_BIBLE / f"{testament}.bzs").read_bytes()
    blob = (WEB_BIBLE / f"{testament}.bzz").read_bytes()
    verses: dict[int, list[tuple[int, int]]] = {}
    raw_verses = (WEB_BIBLE / f"{testament}.bzv").read_bytes()
    for i in range(0, len(raw_verses), 10):
        block, offset, size = struct.unpack("<IIH", raw_verses[i : i + 10])
        if size:
            verses.setdefault(block, []).append((offset, size))
    pieces = []
    for block in range(len(blocks) // 12):
        offset, size, _ = struct.unpack("<III", blocks[12 * block : 12 * block + 12])
        data = zlib.decompress(blob[offset : offset + size])
        pieces += [data[o : o + n].decode("utf-8") for o, n in sorted(set(verses.get(block, [])))]
    return " ".join(pieces)


def _osis_text(osis: str) -> str:
    osis = re.sub(r"<note\b.*?</note>", "\x00", osis, flags=re.S)  # footnotes stand where a space was
    osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", osis, flags=re.S)
    osis = re.sub(r'<div\b(?=[^>]*\bsID=)(?=[^>]*type="x-p")[^>]*/>', "\n\n", osis)
    osis = re.sub(r"<lg\b[^>]*/>", "\n\n", osis)
    osis = re.sub(r"<(l|lb|item)\b(?![^>]*\beID=)[^>]*/?>", "\n", osis)
    text = html.unescape(re.sub(r"<[^>]+>", "", osis))
    text = re.sub(r"\x00(?=[\s.,;:!?’”)\]]|$)", "", text).replace("\x00", " ")
    text = re.sub(r"[ \t]+", " ", text)
    return clean(re.sub(r" *\n *", "\n", text))


_CHAPTER = re.compile(r'<chapter\b[^>]*\b(sID|eID)="([^"]+)"[^>]*/>')


_BOOK_DIV = re.compile(r'<div\b(?=[^>]*type="book")[^>]*\b(sID|eID)="[^"]+"[^>]*/>')


def web_bible() -> Iterator[str]:
    """World English Bible (with Deuterocanon), one document per chapter, plus its preface and glossary.

    Text that sits inside a book but outside its chapters is dropped: in this module those are
    verses the NRSVA versification could not place (Greek Esther, Tobit, ...), out of order.
    """
    for testament in ("ot", "nt"):
        osis = _sword_testament(testament)
        marks = list(_BOOK_DIV.finditer(osis))
        # preface before the first book, glossary after the last
        for matter in (osis[: marks[0].start()], osis[marks[-1].end() :]):
            text = _osis_text(matter)
            if len(text) >= MIN_DOC_CHARS:
                yield from split_long(text)
        for start, end in zip(marks, marks[1:]):
            if start[1] != "sID" or end[1] != "eID":
                continue
            book = osis[start.end() : end.start()]
            name = re.match(r'\s*<milestone n="([^"]+)" type="x-usfm-h"/>', book)
            pos = 0
            for m in _CHAPTER.finditer(book):
                if m[1] == "eID" and name:
                    text = _osis_text(book[pos : m.start()])
                    if text:
                        yield f"{name[1]} {m[2].rsplit('.', 1)[-1]}\n\n{text}"
                pos = m.end()


def _unwrap(block: str) -> str:
    """Join a hard-wrapped paragraph into one line unless it is indented like verse or code."""
    lines = block.split("\n")
    indents = {len(l) - len(l.lstrip(" ")) for l in lines}
    return " ".join(l.strip() for l in lines) if len(indents) == 1 else block


def jargon_file() -> Iterator[str]:
    """The Jargon File 4.4.7: its chapters and appendices, and lexicon entries grouped ~6k chars."""
    lines = gzip.open(JARGON, "rt", encoding="utf-8").read().replace("\xa0", " ").split("\n")
    starts = [i for i, l in enumerate(lines) if re.match(r"(Chapter \d+|Appendix [A-Z])\. ", l)]
    glossary = next(i for i, l in enumerate(lines) if l == "Glossary")
    first_entry = next(i for i, l in enumerate(lines) if l.startswith("   :"))
    appendix = next(i for i, l in enumerate(lines) if l.startswith("Appendix A. "))

    def paragraphs(chunk: list[str]) -> str:
        blocks = "\n".join(l[3:] if l.startswith("   ") else l for l in chunk).split("\n\n")
        kept = [_unwrap(b.strip("\n")) for b in blocks if b.strip() and not re.search("[\u2500-\u257f]", b)]
        return re.sub(r"\{([^{}\n]+)\}", r"\1", "\n\n".join(kept))  # {cross-reference} -> text

    for a, b in zip(starts, starts[1:] + [len(lines)]):
        if a < glossary or a >= appendix:
            yield from split_long(clean(paragraphs(lines[a : min(b, glossary) if a < glossary else b])))
    entries, cur, in_letter_index = [], [], False
    for line in lines[first_entry:appendix]:
        if re.fullmatch(r"  [A-Z0-9]", line):  # a letter heading, then that letter's list of entries
            in_letter_index = True
        elif line.startswith("   :"):
            in_letter_index = False
            if cur:
                entries.append(clean(paragraphs(cur)))
                cur = []
        if not in_letter_index:
            cur.append(line)
    entries.append(clean(paragraphs(cur)))
    yield from group(entries, max_chars=6_000)


def devils_dictionary() -> Iterator[str]:
    """Ambrose Bierce's The Devil's Dictionary (1911): the preface, then entries grouped ~6k chars."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:
        n = 0
        for ch in s:
            n = n * 64 + alphabet.index(ch)
        return n

    data = gzip.open(f"{DEVIL}.dict.dz").read()  # dictzip is gzip-compatible
    index = [l.split("\t") for l in Path(f"{DEVIL}.index").read_text(encoding="utf-8").splitlines()]
    index.sort(key=lambda row: b64(row[1]))  # file order = the book's order
    entries = []
    for word, off, size in index:
        text = clean(data[b64(off) : b64(off) + b64(size)].decode("utf-8"))
        if word == "00databaseinfo":
            yield text[text.index("The original data") :]  # provenance note + the book's preface
        elif not word.startswith("00database"):
            entries.append(text)
    yield from group(entries, max_chars=6_000)


SOURCES = {
    "python-docs": (Source("python-docs", ("python3-doc", "python3.11-doc"), 3_500_000, PY_DOCS / "license.html"), python_docs),
    "wordnet": (Source("wordnet", ("wordnet-base",), 2_500_000, Path("/usr/share/doc/wordnet-base/copyright")), wordnet),
    "web-bible": (Source("web-bible", ("sword-text-web",), 2_500_000, Path("/usr/share/doc/sword-text-web/copyright")), web_bible),
    "jargon-file": (Source("jargon-file", ("jargon-text",), None, Path("/usr/share/doc/jargon-text/copyright")), jargon_file),
    "devils-dictionary": (Source("devils-dictionary", ("dict-devil",), None, Path("/usr/share/doc/dict-devil/copyright")), devils_dictionary),
}


# ----------------------------------------------------------------------------- build


def package_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"Debian package {package!r} is not installed; run: apt-get install {package}")
    return result.stdout


def select(docs: list[str], budget: int | None, rng: random.Random) -> list[str]:
    """Shuffle, then keep documents while they fit the budget (so the sample is uniform)."""
    docs = docs[:]
    rng.shuffle(docs)
    if budget is None:
        return docs
    kept, used = [], 0
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if used + size <= budget:
            kept.append(doc)
            used += size
    return kept


def write_jsonl_gz(path: Path, docs: list[str], source: str) -> None:
    """Byte-reproducible gzip (mtime 0, no file name), written to a temp name then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        for doc in docs:
            gz.write((json.dumps({"text": doc, "source": source}, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def build(out_dir: Path, seed: int = SEED, names: list[str] | None = None) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()  # exact duplicates across all sources are dropped
    stats = []
    for name in names or list(SOURCES):
        source, extract = SOURCES[name]
        versions = {p: package_version(p) for p in source.packages}
        docs = []
        for doc in extract():
            doc = clean(doc)
            digest = hashlib.sha1(doc.encode("utf-8")).hexdigest()
            if len(doc) >= MIN_DOC_CHARS and digest not in seen:
                seen.add(digest)
                docs.append(doc)
        available = sum(len(d.encode("utf-8")) for d in docs)
        docs = select(docs, source.budget_bytes, random.Random(f"{seed}-{name}"))
        path = out_dir / f"{name}.jsonl.gz"
        write_jsonl_gz(path, docs, name)
        license_text = source.license_from.read_text(encoding="utf-8")
        if source.license_from.suffix == ".html":
            license_text = "\n\n".join(html_sections(_sphinx_body(source.license_from)))
        (out_dir / f"LICENSE-{name}").write_text(license_text.rstrip() + "\n", encoding="utf-8")
        stats.append({
            "source": name, "packages": versions, "docs": len(docs),
            "text_bytes": sum(len(d.encode("utf-8")) for d in docs), "available_bytes": available,
            "gz_bytes": path.stat().st_size,
        })
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="output folder (default: the bundled corpus)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--sources", nargs="*", choices=list(SOURCES), help="only these sources")
    args = parser.parse_args()
    stats = build(args.out, args.seed, args.sources)
    print("| file | documents | text MB | gzip MB | packages |")
    print("|---|---:|---:|---:|---|")
    for s in stats:
        pkgs = ", ".join(f"{p} {v}" for p, v in s["packages"].items())
        print(f"| {s['source']}.jsonl.gz | {s['docs']:,} | {s['text_bytes'] / 1e6:.2f} "
              f"(of {s['available_bytes'] / 1e6:.2f}) | {s['gz_bytes'] / 1e6:.2f} | {pkgs} |")
    print(f"| total | {sum(s['docs'] for s in stats):,} | {sum(s['text_bytes'] for s in stats) / 1e6:.2f} "
          f"| {sum(s['gz_bytes'] for s in stats) / 1e6:.2f} | |")


if __name__ == "__main__":
    main()
