"""The tokenizer: sentencepiece BPE with byte fallback and nine chat special tokens.

Guarantees that the rest of the codebase leans on:
- decode(encode(s)) == s for every str that is valid UTF-8 (no normalization, no <unk>, whitespace kept);
- the special tokens are single ids that no plain text can ever produce (sentencepiece control symbols);
- token_bytes()[id] is the UTF-8 length of each token's text, so bits-per-byte is exact.

One sentencepiece trap needs handling by hand: sentencepiece writes a space as U+2581 '▁' inside its pieces,
so a literal '▁' in the input would come back as a space. We never show '▁' to sentencepiece: at encode time
runs of it become explicit byte-fallback ids, and at training time it is dropped from the corpus (where
sentencepiece could not tell it from a space), so every '▁' inside a learned piece means a space.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from llm.conversation import Conversation, content_parts, validate_conversation

SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
MODEL_FILENAME = "tokenizer.model"

SPACE_MARK = "\u2581"  # '▁': sentencepiece's internal stand-in for a space
_SPACE_MARK_RUNS = re.compile(f"({SPACE_MARK}+)")
# Training sentences are documents cut at line ends into chunks of at most this many characters.
# sentencepiece silently skips sentences longer than max_sentence_length *bytes*; 4 bytes per char is the
# UTF-8 worst case, so no chunk is ever skipped.
CHUNK_CHARS = 4096
_VOCAB_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _chunks(text: str, limit: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut one document into pieces of at most `limit` chars, preferring to cut after a newline."""
    start = 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit) + 1
        if cut <= start:  # one line longer than the limit: cut it hard
            cut = start + limit
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _training_sentences(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """The corpus as sentencepiece sees it: '▁'-free chunks, stopping once max_chars characters were fed."""
    fed = 0
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"Tokenizer.train expects an iterable of str documents, got {type(text).__name__}")
        for chunk in _chunks(text.replace(SPACE_MARK, "")):
            if max_chars is not None:
                chunk = chunk[: max_chars - fed]
            if chunk:
                fed += len(chunk)
                yield chunk
            if max_chars is not None and fed >= max_chars:
                return


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _merge_system(messages: list[dict]) -> list[dict]:
    """The messages with a leading system message folded into the first user turn (a copy; input untouched)."""
    if messages[0]["role"] != "system":
        return messages
    system, user, *rest = messages
    return [{**user, "content": f"{system['content']}\n\n{user['content']}"}, *rest]


class Tokenizer:
    """A trained sentencepiece model plus the byte-exact bookkeeping around it. Build with train() or load()."""

    def __init__(self, model_bytes: bytes, path: Path | None = None):
        self._model_bytes = model_bytes
        self.path = path  # the file it came from (for messages); None if built from bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size: int = self._sp.get_piece_size()
        self._special_ids = {name: self._sp.piece_to_id(name) for name in SPECIAL_TOKENS}
        for name, i in self._special_ids.items():
            if not self._sp.is_control(i):
                raise ValueError(f"this sentencepiece model has no control symbol {name!r}: it was not "
                                 f"made by Tokenizer.train; retrain it with `python -m llm.train_tokenizer`")
        self.bos_id: int = self._special_ids["<|bos|>"]
        self._id_bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self._space_mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]

    def _piece_bytes(self, i: int) -> bytes:
        """The exact bytes a token stands for when decoded."""
        sp = self._sp
        if sp.is_control(i):
            return sp.id_to_piece(i).encode()  # special tokens decode to their literal names
        if sp.is_unknown(i):
            return b""  # never produced by encode (byte fallback covers every char)
        if sp.is_byte(i):
            return bytes([int(sp.id_to_piece(i)[3:5], 16)])  # pieces look like "<0xE2>"
        return sp.id_to_piece(i).replace(SPACE_MARK, " ").encode()

    # ---------------------------------------------------------------- training and files

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, out_dir: str | Path, max_chars: int | None = None,
              num_threads: int = 2) -> "Tokenizer":
        """Train a BPE vocabulary on the documents in `texts` (up to max_chars characters) and write
        out_dir/tokenizer.model. Same documents and vocab_size -> same file, byte for byte."""
        min_size = 1 + len(SPECIAL_TOKENS) + 256  # <unk>, specials, byte fallback
        if vocab_size <= min_size:
            raise ValueError(f"vocab_size={vocab_size} is too small: <unk>, {len(SPECIAL_TOKENS)} special tokens "
                             f"and 256 byte tokens already take {min_size} ids; use e.g. 512 or more")
        if max_chars is not None and max_chars <= 0:
            raise ValueError(f"max_chars={max_chars} must be positive (or None for the whole corpus)")
        sentences = _training_sentences(texts, max_chars)
        try:
            first = next(sentences)
        except StopIteration:
            raise ValueError("Tokenizer.train got no text: the documents iterator was empty or all blank") from None

        def corpus() -> Iterator[str]:
            yield first
            yield from sentences

        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=corpus(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
                # round-trip exactness: no normalization, whitespace kept verbatim, unknown chars become bytes
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                byte_fallback=True, allow_whitespace_only_pieces=True, split_digits=True,
                # specials are control symbols: own ids, never matched in text; sentencepiece's own bos/eos/pad off
                control_symbols=list(SPECIAL_TOKENS), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                # read every chunk in order (no sampling) so training is deterministic
                input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=4 * CHUNK_CHARS,
                # a small corpus may not hold vocab_size distinct pieces; then the vocab is just smaller
                hard_vocab_limit=False, num_threads=num_threads, minloglevel=2,
            )
        except RuntimeError as e:
            match = _VOCAB_TOO_SMALL.search(str(e))
            if match:
                raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: its characters alone "
                                 f"need {match.group(2)} ids; raise vocab_size above {match.group(2)}") from e
            raise
        tokenizer = cls(cls._canonical(model.getvalue()))
        tokenizer.path = tokenizer.save(out_dir)
        return tokenizer

    @staticmethod
    def _canonical(model_bytes: bytes) -> bytes:
        """Drop num_threads from the recorded trainer settings: it does not change the vocabulary, and the
        file's hash is our fingerprint."""
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_bytes)
        proto.trainer_spec.ClearField("num_threads")
        return proto.SerializeToString(deterministic=True)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a folder holding tokenizer.model, or from the .model file itself."""
        path = Path(path)
        file = path / MODEL_FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {str(path)!r} (looked for {str(file)!r}); train one with "
                                    f"`python -m llm.train_tokenizer` or pass the folder that holds {MODEL_FILENAME}")
        return cls(file.read_bytes(), path=file)

    def save(self, out_dir: str | Path) -> Path:
        """Write out_dir/tokenizer.model (atomically) and return its path."""
        path = Path(out_dir) / MODEL_FILENAME
        _atomic_write(path, self._model_bytes)
        return path

    def fingerprint(self) -> str:
        """sha256 of the model file: two artifacts agree on the tokenizer iff their fingerprints match."""
        return hashlib.sha256(self._model_bytes).hexdigest()

    def __getstate__(self) -> dict:  # DataLoader workers pickle us; the C++ processor itself cannot be
        return {"model_bytes": self._model_bytes, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_bytes"], state["path"])

    # ---------------------------------------------------------------- encode / decode

    def special_id(self, name: str) -> int:
        """Id of a special token, by full name "<|assistant_end|>" or short name "assistant_end"."""
        full = name if name.startswith("<|") else f"<|{name}|>"
        if full not in self._special_ids:
            raise ValueError(f"unknown special token {name!r}; valid names: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[full]

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode_marks(text) if SPACE_MARK in text else self._sp.encode(text)
        return [self.bos_id, *ids] if prepend_bos else ids

    def encode_batch(self, texts: list[str], prepend_bos: bool = False, num_threads: int = 4) -> list[list[int]]:
        """Same as [encode(t) for t in texts], with sentencepiece's thread pool doing the work."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("encode_batch expects a list of str; use encode() for a single string")
        plain = [i for i, t in enumerate(texts) if SPACE_MARK not in t]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain], num_threads=num_threads)):
            out[i] = ids
        for i, t in enumerate(texts):
            if SPACE_MARK in t:  # rare: keep the general path serial
                out[i] = self._encode_marks(t)
        return [[self.bos_id, *ids] for ids in out] if prepend_bos else out

    def _encode_marks(self, text: str) -> list[int]:
        """Encode text containing literal '▁': the text between runs goes through sentencepiece, each '▁'
        becomes its three UTF-8 byte tokens so it decodes as itself, not as a space."""
        ids: list[int] = []
        for part in _SPACE_MARK_RUNS.split(text):
            if part.startswith(SPACE_MARK):
                ids.extend(self._space_mark_ids * len(part))
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of a token sequence (useful when streaming: a character may span several tokens)."""
        table = self._id_bytes
        try:
            return b"".join([table[int(i)] for i in ids])
        except IndexError:
            bad = [int(i) for i in ids if not 0 <= int(i) < self.vocab_size]
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token sequence; special ids appear as their literal names. Invalid UTF-8 (a sequence cut
        in the middle of a character) becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_piece(self, id: int) -> str:
        """sentencepiece's name for a token: '▁the', '<0xE2>', '<|bos|>'."""
        if not 0 <= int(id) < self.vocab_size:
            raise ValueError(f"token id {id} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(id))

    def token_bytes(self) -> torch.LongTensor:
        """(vocab_size,) UTF-8 byte count of each token's text, 0 for special tokens and <unk>. For bits per
        byte: sum of nats / (ln 2 * sum of token_bytes[targets])."""
        counts = [0 if i in self._special_ids.values() else len(b) for i, b in enumerate(self._id_bytes)]
        return torch.tensor(counts, dtype=torch.long)

    def compression_report(self, sources: dict[str, list[str]]) -> dict[str, float]:
        """Bytes per token for each named list of texts (higher = better compression)."""
        report = {}
        for name, texts in sources.items():
            n_bytes = sum(len(t.encode()) for t in texts)
            n_tokens = sum(len(ids) for ids in self.encode_batch(list(texts)))
            if n_tokens == 0:
                raise ValueError(f"compression_report: source {name!r} has no text to measure")
            report[name] = n_bytes / n_tokens
        return report

    # ---------------------------------------------------------------- chat

    def render_conversation(self, conversation: Conversation, max_tokens: int | None = None
                            ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its loss mask, in nanochat's format:

            <|bos|> <|user_start|> user text <|user_end|>
                    <|assistant_start|> text <|python_start|> code <|python_end|>
                                        <|output_start|> tool output <|output_end|> text <|assistant_end|> ...

        mask[i] is 1 exactly where ids[i] is something the assistant must learn to produce: its text, its
        python calls (with their python_start/python_end) and its assistant_end. Everything the model is
        given rather than asked to write is 0: bos, user turns, assistant_start (the engine primes it) and tool
        outputs (the engine forces them in). A system message is merged into the first user turn, as our
        format has no system role. Both lists are cut to max_tokens.
        """
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}: keep at least one token (or None for no limit)")
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int] | int, learn: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([learn] * len(tokens))

        special = self.special_id
        add(self.bos_id, 0)
        for message in _merge_system(validate_conversation(conversation)["messages"]):
            if message["role"] == "user":
                add(special("user_start"), 0)
                add(self.encode(message["content"]), 0)
                add(special("user_end"), 0)
                continue
            add(special("assistant_start"), 0)
            for part in content_parts(message["content"]):
                text = self.encode(part["text"])
                if part["type"] == "text":
                    add(text, 1)
                elif part["type"] == "python":
                    add([special("python_start"), *text, special("python_end")], 1)
                else:  # python_output
                    add([special("output_start"), *text, special("output_end")], 0)
            add(special("assistant_end"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: Conversation) -> list[int]:
        """The prompt for generating the assistant's next turn: the conversation without its final assistant
        message (if it ends with one), followed by <|assistant_start|>."""
        messages = validate_conversation(conversation)["messages"]
        if messages[-1]["role"] == "assistant":
            conversation = {**conversation, "messages": messages[:-1]}
        ids, _ = self.render_conversation(conversation)
        return [*ids, self.special_id("assistant_start")]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"
