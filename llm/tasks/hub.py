"""
Load a hub-backed task's rows through `datasets`: from the Hugging Face hub, or from local files
in the hub dataset's own schema (parquet / jsonl / json / csv), or from the small fixture the
package ships for each hub task (tests and the offline CPU pipeline).

Local files are read one by one, each checked first (llm.data.files: not empty, of the format its suffix
says) and its rows after loading (every column the task reads is there, of the right kind, in every row),
so a damaged file fails with one line naming the file, the row and the fix.
"""

import glob
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm.data.files import bad_file, check_file, first_problem
from llm.errors import MissingFileError

DATA_DIR = Path(__file__).parent / "data"
FIXTURES_DIR = DATA_DIR / "fixtures"

DataFiles = str | Path | list[str | Path] | dict[str, Any] | None
Columns = dict[str, type] | None  # the top-level fields a task reads and their kind: str, int, list or dict
FIX = "repair or remove that row, or point data_files= at other files"

_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class HubUnavailableError(RuntimeError):
    """The hub could not serve a dataset; the message names the local-file alternative."""


def fixture_path(task: str) -> Path:
    """The fixture shipped for a hub task: a handful of hand-written rows in the real schema."""
    path = FIXTURES_DIR / f"{task}.jsonl"
    if not path.exists():
        shipped = sorted(p.stem for p in FIXTURES_DIR.glob("*.jsonl"))
        raise ValueError(f"no fixture for task {task!r}; fixtures ship for: {shipped}")
    return path


def _builder(path: str) -> str:
    stem = path
    for suffix in _COMPRESSIONS:
        stem = stem.removesuffix(suffix)
    builder = _BUILDERS.get(Path(stem).suffix)
    if builder is None:
        raise ValueError(f"cannot tell the format of {path!r}; use .parquet, .jsonl, .json or .csv files")
    return builder


def load_local(data_files: DataFiles, split: str, columns: Columns = None):
    """Rows of `split` from local files; a dict maps split names to files, anything else is that split.
    Every file must hold `columns` (when given) in every row."""
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise ValueError(f"data_files has no entry for split {split!r}; it has {sorted(data_files)}")
        data_files = data_files[split]
    # any sequence of paths (a list, or a Hydra ListConfig) is several files; a str or Path is one
    files = [str(f) for f in ([data_files] if isinstance(data_files, (str, Path)) else data_files)]
    if not files:
        raise ValueError("data_files is empty; give at least one parquet/jsonl/csv file")
    paths = []
    for f in files:
        matched = sorted(glob.glob(f)) if any(c in f for c in "*?[") else [f] if Path(f).exists() else []
        if not matched:
            raise MissingFileError(f"data file {f!r} does not exist; fix: point data_files= at existing files")
        paths += matched
    builders = {_builder(f) for f in paths}
    if len(builders) > 1:
        raise ValueError(f"data_files mixes formats {sorted(builders)}: {files}; use one format per split")
    builder = builders.pop()
    for path in paths:
        check_file(path, builder, FIX)
    parts = [_load_file(builder, path, columns) for path in paths]
    if len(parts) == 1:
        return parts[0]
    from datasets import concatenate_datasets

    try:
        return concatenate_datasets(parts)
    except ValueError as err:
        raise ValueError(f"data files {paths} do not share one layout ({err}); give files of one schema") from None


def _load_file(builder: str, path: str, columns: Columns):
    from datasets import load_dataset  # deferred: importing datasets costs ~1 s

    try:
        rows = load_dataset(builder, data_files=[path], split="train")
    except Exception as err:  # datasets wraps what pyarrow or json said in a DatasetGenerationError
        cause = err.__cause__ or err
        raise bad_file(path, first_problem(path, builder) or f"cannot be read ({type(cause).__name__}: "
                                                            f"{' '.join(str(cause).split())[:160]})", FIX) from None
    for name, kind in (columns or {}).items():
        _check_column(rows, name, kind, path)
    return rows


def _check_column(rows, name: str, kind: type, path: str) -> None:
    """Every row holds `name`, of `kind`: the schema says so for all rows at once (no row is visited unless
    one is wrong)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = rows.data.schema
    if name not in schema.names:
        raise bad_file(path, f"has no column {name!r} (it has {schema.names}); the task reads the hub dataset's "
                             f"own layout", FIX)
    arrow_kinds = {str: (pa.types.is_string, pa.types.is_large_string), int: (pa.types.is_integer,),
                   list: (pa.types.is_list, pa.types.is_large_list), dict: (pa.types.is_struct,)}
    if not any(is_kind(schema.field(name).type) for is_kind in arrow_kinds[kind]):
        for i, value in enumerate(rows[name], 1):
            if not isinstance(value, kind) or isinstance(value, bool):
                raise bad_file(path, f"row {i}: {name!r} is {str(value)[:40]!r} ({type(value).__name__}), "
                                     f"not {kind.__name__}", FIX)
        raise bad_file(path, f"column {name!r} does not have one layout in every row ({schema.field(name).type})",
                       FIX)
    column = rows.data.column(name)
    if column.null_count:
        first = pc.is_null(column).to_pylist().index(True)
        raise bad_file(path, f"row {first + 1} has no {name!r}", FIX)


def load_rows(task: str, hub_name: str, config: str | None, split: str, *,
              data_files: DataFiles = None, source: str = "hub", columns: Columns = None):
    """
    Rows of a hub task's split. `data_files` wins; else source="fixture" reads the shipped fixture,
    source="hub" downloads `hub_name` (`config`) and, when the hub is unreachable, raises
    HubUnavailableError naming the local-file options.
    """
    if source not in ("hub", "fixture"):
        raise ValueError(f"source must be 'hub' or 'fixture', got {source!r} (or pass data_files=...)")
    if data_files is None and source == "fixture":
        data_files = fixture_path(task)
    if data_files is not None:
        return load_local(data_files, split, columns)

    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    try:
        return load_dataset(hub_name, config, split=split)
    except (OSError, DatasetNotFoundError) as err:  # ConnectionError is an OSError
        raise HubUnavailableError(
            f"could not load {hub_name!r} (config {config!r}, split {split!r}) from the Hugging Face hub: "
            f"{type(err).__name__}: {err}. Offline? Load the same rows from local files in the dataset's own "
            f"schema with data_files=..., e.g. build_task({task!r}, {split!r}, data_files='{split}.parquet') "
            f"(parquet, jsonl or csv; a dict {{split: files}} works too), or use source='fixture' for the "
            f"small fixture shipped in {FIXTURES_DIR}. Set HF_HUB_OFFLINE=1 to fail fast instead of retrying."
        ) from err
