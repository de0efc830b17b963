"""A row's display text: token ids in, safe text deltas out (for streaming and for stop strings).

Display text is what a person should see of a reply: the tokens' bytes decoded as UTF-8, tool calls
shown GSM8K-style as "<<48/2=24>>" (python_start, python_end, output_end become "<<", "=", ">>"), all
other special tokens hidden.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Iterable, Sequence

from llm.generate.sampling import STOP_TOKENS
from llm.tokenizer import Tokenizer

TOOL_DISPLAY = {"python_start": b"<<", "python_end": b"=", "output_start": b"", "output_end": b">>"}
HIDDEN = ("bos", "user_start", "user_end", "assistant_start", "assistant_end")


def display_pieces(tokenizer: Tokenizer, model_vocab: int) -> list[bytes]:
    """Display bytes of every id the model can sample (ids past the tokenizer's, padding, show nothing)."""
    pieces = [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
    pieces += [b""] * (model_vocab - tokenizer.vocab_size)
    for name in HIDDEN:
        pieces[tokenizer.special_id(name)] = b""
    for name, shown in TOOL_DISPLAY.items():
        pieces[tokenizer.special_id(name)] = shown
    return pieces


@functools.lru_cache(maxsize=4)
def _tokenizer_pieces(tokenizer: Tokenizer) -> tuple[list[bytes], frozenset[int]]:
    return display_pieces(tokenizer, tokenizer.vocab_size), frozenset(tokenizer.special_id(n) for n in STOP_TOKENS)


def completion_text(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """The display text of generated ids up to the first stop token: how RL rewards and evaluation read
    an answer (a tool call shows as "<<expr=result>>", as GSM8K writes it)."""
    pieces, stops = _tokenizer_pieces(tokenizer)
    shown = []
    for token in ids:
        token = int(token)
        if token in stops:
            break
        if token < len(pieces):
            shown.append(pieces[token])
    return b"".join(shown).decode("utf-8", errors="replace")


class TextStream:
    """A row's display text, released incrementally and safely.

    UTF-8 characters split across tokens are held until complete; text that could still become a
    stop string is held until it can't; at a stop string the text is cut (the stop string itself
    is not shown, as in the OpenAI API) and `stopped` turns True. Stops are matched on the decoded
    text, so they behave exactly as they read.
    """

    def __init__(self, pieces: Sequence[bytes], stop: Sequence[str] = ()):
        self._pieces, self._stops = pieces, list(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # decoded so far (the decoder keeps an unfinished character to itself)
        self._released = 0  # characters handed out by take()
        self._taken = 0
        self.stopped = False

    @property
    def chars(self) -> int:
        """Characters of text decoded so far: where the next token's text starts (a character split
        across tokens counts once it is complete)."""
        return len(self._text)

    def push(self, token: int) -> None:
        if not self.stopped and self._pieces[token]:
            self._add(self._decoder.decode(self._pieces[token]))

    def finish(self) -> None:
        """The row ended: release everything still held back."""
        if not self.stopped:
            self._add(self._decoder.decode(b"", final=True))
            self._released = len(self._text)

    def _add(self, new: str) -> None:
        start = len(self._text)
        self._text += new
        # Only a stop string overlapping the new text can be new.
        found = [self._text.find(s, max(0, start - len(s) + 1)) for s in self._stops]
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self._text, self._released, self.stopped = self._text[:cut], cut, True
        else:
            self._released = len(self._text) - self._held_back()

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        text, best = self._text, 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def take(self) -> str:
        """Text released since the last take()."""
        upto = max(self._released, self._taken)
        text, self._taken = self._text[self._taken:upto], upto
        return text
