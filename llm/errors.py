"""BadFileError: a file a command reads is missing, empty, truncated or not what its name says.

Artifacts (llm.artifact), Lightning checkpoints (llm.stages.checkpoint_io) and data files (llm.data.files,
llm.tasks) raise it with one line that names the file, what is wrong with it and the fix. The
`python -m llm.*` commands run their work inside `one_line_errors()`, so the user sees that line and an
exit status of 1, not a library's traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager


class BadFileError(ValueError):
    """The message is one line: `<file>: <what is wrong>; fix: <what to do>`."""

    def __init__(self, line: str):
        # A DataLoader worker's error comes back re-raised as BadFileError("Caught BadFileError in DataLoader
        # worker process 0.\nOriginal Traceback ...\nllm.errors.BadFileError: <line>"): keep the line.
        last = line.rstrip().rsplit("\n", 1)[-1]
        marker = f"{type(self).__name__}: "
        super().__init__(last.split(marker, 1)[1] if "\n" in line and marker in last else line)


class MissingFileError(BadFileError, FileNotFoundError):
    """A file that should be there is not (also a FileNotFoundError, for callers that catch that)."""


@contextmanager
def one_line_errors():
    """Inside an entry point's main (within @hydra.main, which would print a traceback): a BadFileError
    ends the command with its one line on stderr and exit status 1."""
    try:
        yield
    except BadFileError as err:
        sys.exit(f"error: {err}")
