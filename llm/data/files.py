"""Local data files: is a file what its name says? One line naming the file, the row and the fix when not.

`datasets` reads the files (llm.data.sources for text, llm.tasks.hub for task rows); its own errors name
neither the file nor the row. So before reading, check_file looks at a file cheaply: not empty, and its
first bytes and first rows are of the format its suffix promises (a parquet footer, JSON objects per line,
UTF-8 text), each row with a text field that is a string. When a read fails later anyway (a damaged row
deep in a file), first_problem scans the whole file for what broke, for the error message.

Formats are `datasets` builder names: parquet, json (.jsonl, or .json holding one JSON document), text, csv.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import itertools
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

from llm.errors import BadFileError

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # what the standard library decompresses
UNOPENED = (".zst",)   # compressions `datasets` reads but the standard library does not: only checked for size
CHECKED_ROWS = 16      # rows check_file reads of each file
CHECKED_BYTES = 1 << 16  # bytes of a text file check_file decodes


def bad_file(path: str | Path, what: str, fix: str) -> BadFileError:
    return BadFileError(f"{path}: {what}; fix: {fix}")


def check_file(path: str | Path, fmt: str, fix: str, text_field: str | None = None) -> None:
    """Raise BadFileError unless `path` is non-empty and starts as `fmt` data (rows with a str `text_field`)."""
    if Path(path).stat().st_size == 0:
        raise bad_file(path, "is empty", fix)
    problem = first_problem(path, fmt, text_field, rows=CHECKED_ROWS)
    if problem:
        raise bad_file(path, problem, fix)


def first_problem(path: str | Path, fmt: str, text_field: str | None = None, rows: int | None = None) -> str | None:
    """What is wrong with the first `rows` rows of the file (all rows when None); None when nothing is."""
    path = Path(path)
    if path.suffix in UNOPENED:
        return None
    try:
        if fmt == "parquet":
            return _parquet_problem(path, text_field, rows)
        if fmt == "json":
            return _json_problem(path, text_field, rows)
        return _text_problem(path, None if rows is None else CHECKED_BYTES)
    except UnicodeDecodeError as err:
        return f"is not UTF-8 text ({err.reason}: {err.object[err.start:err.start + 4]!r})"
    except (OSError, EOFError, lzma.LZMAError) as err:  # a compressed file cut short, or not compressed at all
        return f"cannot be read ({type(err).__name__}: {' '.join(str(err).split())})"


def _open_text(path: Path):
    opener = OPENERS.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", errors="strict", newline="")


def _parquet_problem(path: Path, text_field: str | None, rows: int | None) -> str | None:
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(path.stat().st_size - 4, 0))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1" or path.stat().st_size < 12:
        where = "start" if head != b"PAR1" else "end"
        return f"is not a whole parquet file (no PAR1 marker at its {where}: another format, or cut short)"
    try:
        file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow.ArrowInvalid and friends: a damaged footer
        return f"has a damaged parquet footer ({' '.join(str(err).split())})"
    if text_field is None:
        return None
    import pyarrow as pa

    if text_field not in file.schema_arrow.names:
        return f"has no column {text_field!r} (columns: {file.schema_arrow.names})"
    kind = file.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return f"column {text_field!r} holds {kind}, not text"
    seen = 0
    for batch in file.iter_batches(columns=[text_field], batch_size=1024):
        column = batch.column(0)
        if column.null_count:
            first = column.is_null().to_pylist().index(True)
            return f"row {seen + first + 1} has no {text_field!r} (null)"
        seen += len(column)
        if rows is not None and seen >= rows:
            break
    return None


def _json_rows(path: Path) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _json_problem(path: Path, text_field: str | None, rows: int | None) -> str | None:
    lines = _json_rows(path)
    first = next(lines, None)
    if first is None:
        return "holds no rows (only blank lines)"
    try:
        json.loads(first[1])
    except json.JSONDecodeError:
        if _uncompressed_name(path).endswith(".json"):
            return _json_document_problem(path)
    for lineno, line in itertools.islice(itertools.chain([first], lines), rows):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {lineno} is not JSON ({err})"
        if not isinstance(row, dict):
            return f"line {lineno} is a JSON {type(row).__name__}, not an object (one row per line)"
        if text_field is not None:
            if text_field not in row:
                return f"line {lineno} has no {text_field!r} field (it has {sorted(row)[:8]})"
            if not isinstance(row[text_field], str):
                return f"line {lineno}: {text_field!r} is {_kind(row[text_field])}, not text"
    return None


def _uncompressed_name(path: Path) -> str:
    return path.name.removesuffix(path.suffix) if path.suffix in OPENERS else path.name


def _json_document_problem(path: Path) -> str | None:
    """A .json file that is one JSON document (a list of rows, pretty-printed) rather than JSON lines."""
    try:
        with _open_text(path) as f:
            json.load(f)
    except json.JSONDecodeError as err:
        return f"is not JSON ({err})"
    return None


def _text_problem(path: Path, limit: int | None) -> str | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = OPENERS.get(path.suffix, open)
    done = 0
    with opener(path, "rb") as f:
        while limit is None or done < limit:
            chunk = f.read(CHECKED_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                return f"is not UTF-8 text ({err.reason} near byte {done + err.start})"
            if not chunk:
                break
            done += len(chunk)
    return None


def _kind(value) -> str:
    return "null" if value is None else f"{json.dumps(value)[:40]} ({type(value).__name__})"
