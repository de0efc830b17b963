"""The pretraining corpus bundled with the package: real English text, one gzipped JSON-lines
file per source ({"text": ..., "source": ...} per line). See README.md beside this file for
provenance and licenses, and dev/build_corpus.py for how the files are rebuilt."""

from pathlib import Path

CORPUS_DIR: Path = Path(__file__).resolve().parent
_SUFFIX = ".jsonl.gz"


def available_sources() -> list[str]:
    """Names of the bundled sources (the file stems), sorted."""
    return sorted(p.name[: -len(_SUFFIX)] for p in CORPUS_DIR.glob(f"*{_SUFFIX}"))


def corpus_files(sources: list[str] | None = None) -> list[Path]:
    """Paths of the bundled corpus files, all of them or only the named sources (in that order).

    Each file is shuffled at build time, so its first documents are a fair validation sample.
    """
    available = available_sources()
    if sources is None:
        return [CORPUS_DIR / f"{name}{_SUFFIX}" for name in available]
    if isinstance(sources, str):
        raise ValueError(f"sources must be a list of names, got the string {sources!r}; use [{sources!r}]")
    unknown = [name for name in sources if name not in available]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; available: {available}")
    return [CORPUS_DIR / f"{name}{_SUFFIX}" for name in sources]
