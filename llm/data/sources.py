"""Where text comes from: a hub dataset (streamed), local files, or the corpus bundled with the package.

Everything goes through `datasets`, so one code path reads parquet shards on a cluster, a folder of
jsonl on a laptop, and FineWeb-Edu over the network. A source yields documents (plain strings) in a
fixed order; the data modules decide who reads which document.

Local files are checked twice (llm.data.files): cheaply when the source is made (each file not empty, its
first rows of the format its suffix says, with a string text field), and row by row as they are read, in
DataLoader workers too. Either way a damaged file fails with one line naming the file, the row and the fix.
"""

from __future__ import annotations

import glob
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import datasets

from llm.data.files import bad_file, check_file, first_problem
from llm.errors import MissingFileError

# `datasets` builder name for each local file suffix
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text",
             ".jsonl.gz": "json", ".json.gz": "json", ".txt.gz": "text"}
FIX = ("repair or remove that row, or leave the file out of data.source.files (data.source.text_field names "
       "the field that holds the text)")


@dataclass
class TextSource:
    kind: str = "bundled"            # "bundled" | "files" | "hub"
    name: str | None = None          # hub dataset name, e.g. HuggingFaceFW/fineweb-edu
    subset: str | None = None        # hub configuration name
    split: str = "train"
    files: list[str] = field(default_factory=list)  # local files or globs (kind=files)
    text_field: str = "text"
    corpus: list[str] | None = None  # bundled sources to use (None: all of them)

    def __post_init__(self):
        if self.kind not in ("bundled", "files", "hub"):
            raise ValueError(f"data source kind={self.kind!r} is not one of bundled, files, hub")
        if self.kind == "hub" and not self.name:
            raise ValueError("data source kind=hub needs a dataset name: set data.source.name=<owner/dataset>")
        if self.kind == "files":
            if not self.files:
                raise ValueError("data source kind=files needs files: set data.source.files='[path/*.parquet]'")
            for path in resolve_files(list(self.files)):  # fail now, not inside a DataLoader worker
                check_file(path, _builder_for(path), FIX, self.text_field)


def _builder_for(path: str) -> str:
    for suffix, builder in sorted(_BUILDERS.items(), key=lambda kv: -len(kv[0])):
        if path.endswith(suffix):
            return builder
    raise ValueError(f"data file {path!r} has an unknown type: use one of {sorted(_BUILDERS)}")


def resolve_files(patterns: list[str]) -> list[str]:
    """Expand globs; every pattern must match an existing file."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matched:
            raise MissingFileError(f"data file {pattern!r} does not exist: check data.source.files")
        files.extend(matched)
    builders = {_builder_for(f) for f in files}
    if len(builders) > 1:
        raise ValueError(f"data files mix types {sorted(builders)}: give files of one type per source")
    return files


def _load_bundled(corpus: list[str] | None) -> datasets.Dataset:
    """All bundled sources blended evenly: every prefix of the result holds each source in proportion
    to its size, so the held-out first documents and any training prefix sample every source."""
    from llm.data.corpus import corpus_files
    parts = [datasets.load_dataset("json", data_files=str(p), split="train") for p in corpus_files(corpus)]
    keys = [((j + 0.5) / len(part), s, j) for s, part in enumerate(parts) for j in range(len(part))]
    offsets = list(itertools.accumulate([0] + [len(part) for part in parts]))
    order = [offsets[s] + j for _, s, j in sorted(keys)]
    return datasets.concatenate_datasets(parts).select(order)


def load_documents(source: TextSource) -> datasets.Dataset | datasets.IterableDataset:
    """The source as a `datasets` dataset with one document per example (streamed unless bundled)."""
    if source.kind == "hub":
        return _load_hub(source)
    if source.kind == "bundled":
        return _load_bundled(source.corpus)
    return _load_files(resolve_files(source.files), source.text_field)


def _load_files(files: list[str], field_name: str) -> datasets.IterableDataset:
    builder = _builder_for(files[0])
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:  # streaming still reads the first rows, to learn the columns
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    except Exception as err:  # pyarrow, json, gzip and codecs errors
        raise _damaged(files, field_name, err) from None


def _load_hub(source: TextSource) -> datasets.IterableDataset:
    try:
        return datasets.load_dataset(source.name, source.subset, split=source.split, streaming=True)
    except Exception as err:  # offline, unknown name, gated: all end the same way for the user
        raise RuntimeError(
            f"could not open hub dataset {source.name!r} ({type(err).__name__}: {err}). Without network access, "
            f"download its files and use them locally: data.source.kind=files "
            f"data.source.files='[/path/to/shards/*.parquet]' (parquet, jsonl or txt)") from err


def iter_texts(source: TextSource, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Documents start..stop of the source, as strings, in the source's fixed order."""
    if source.kind == "files":
        rows = itertools.chain.from_iterable(_file_texts(f, source.text_field) for f in resolve_files(source.files))
        yield from itertools.islice(rows, start, stop)
        return
    field_name = source.text_field
    for example in itertools.islice(load_documents(source), start, stop):
        if field_name not in example:
            raise KeyError(f"data source has no {field_name!r} column (columns: {sorted(example)}): "
                           f"set data.source.text_field")
        yield example[field_name]


def _file_texts(path: str, field_name: str) -> Iterator[str]:
    """The text of every row of one local file; a row that does not parse or whose text is not a string
    raises BadFileError naming the file and the row (one file at a time, so the error knows which)."""
    rows = iter(_load_files([path], field_name))
    row = 0
    while True:
        try:
            example = next(rows)
        except StopIteration:
            return
        except Exception as err:  # pyarrow, json, gzip and codecs errors surface here, mid-stream
            raise _damaged([path], field_name, err, f"row {row + 1} ") from None
        row += 1
        text = example.get(field_name)
        if not isinstance(text, str):
            got = "null" if text is None else f"{str(text)[:40]!r} ({type(text).__name__})"
            raise _damaged([path], field_name, f"row {row}: {field_name!r} is {got}, not text")
        yield text


def _damaged(files: list[str], field_name: str, seen: Exception | str, where: str = ""):
    """The exact damage, from a scan of the whole files (only on this error path); else what the read saw."""
    for path in files:
        problem = first_problem(path, _builder_for(path), field_name)
        if problem:
            return bad_file(path, problem, FIX)
    if isinstance(seen, Exception):
        seen = f"{where}cannot be read ({type(seen).__name__}: {' '.join(str(seen).split())[:160]})"
    return bad_file(files[0] if len(files) == 1 else files, seen, FIX)
