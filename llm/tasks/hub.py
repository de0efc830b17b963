"""
Load a hub-backed task's rows through `datasets`: from the Hugging Face hub, or from local files
in the hub dataset's own schema (parquet / jsonl / json / csv), or from the small fixture the
package ships for each hub task (tests and the offline CPU pipeline).
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
FIXTURES_DIR = DATA_DIR / "fixtures"

DataFiles = str | Path | list[str | Path] | dict[str, Any] | None

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


def load_local(data_files: DataFiles, split: str):
    """Rows of `split` from local files; a dict maps split names to files, anything else is that split."""
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise ValueError(f"data_files has no entry for split {split!r}; it has {sorted(data_files)}")
        data_files = data_files[split]
    # any sequence of paths (a list, or a Hydra ListConfig) is several files; a str or Path is one
    files = [str(f) for f in ([data_files] if isinstance(data_files, (str, Path)) else data_files)]
    if not files:
        raise ValueError("data_files is empty; give at least one parquet/jsonl/csv file")
    for f in files:
        if not any(c in f for c in "*?[") and not Path(f).exists():
            raise FileNotFoundError(f"data file {f!r} does not exist")
    builders = {_builder(f) for f in files}
    if len(builders) > 1:
        raise ValueError(f"data_files mixes formats {sorted(builders)}: {files}; use one format per split")
    from datasets import load_dataset  # deferred: importing datasets costs ~1 s

    return load_dataset(builders.pop(), data_files=files, split="train")


def load_rows(task: str, hub_name: str, config: str | None, split: str, *,
              data_files: DataFiles = None, source: str = "hub"):
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
        return load_local(data_files, split)

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
