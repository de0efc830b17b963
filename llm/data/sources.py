"""Where text comes from: a hub dataset (streamed), local files, or the corpus bundled with the package.

Everything goes through `datasets`, so one code path reads parquet shards on a cluster, a folder of
jsonl on a laptop, and FineWeb-Edu over the network. A source yields documents (plain strings) in a
fixed order; the data modules decide who reads which document.
"""

from __future__ import annotations

import glob
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import datasets

# `datasets` builder name for each local file suffix
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text",
             ".jsonl.gz": "json", ".json.gz": "json", ".txt.gz": "text"}


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
            resolve_files(list(self.files))  # fail now, not inside a DataLoader worker


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
            raise FileNotFoundError(f"data file {pattern!r} does not exist: check data.source.files")
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
    files = resolve_files(source.files)
    builder = _builder_for(files[0])
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)


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
    docs = load_documents(source)
    field_name = source.text_field
    for example in itertools.islice(docs, start, stop):
        if field_name not in example:
            raise KeyError(f"data source has no {field_name!r} column (columns: {sorted(example)}): "
                           f"set data.source.text_field")
        yield example[field_name]
