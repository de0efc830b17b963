"""Our sentencepiece model <-> a `tokenizers` BPE (tokenizer.json) that encodes every string the same way.

sentencepiece BPE (as Tokenizer.train configures it: no normalization, no dummy prefix, byte fallback)
splits text into characters and repeatedly merges the adjacent pair whose concatenation is the
best-scored piece, leftmost first; characters it has no piece for become their UTF-8 byte tokens. A
`tokenizers` BPE does the same given the right merge list: every split (left, right) of every piece into
two pieces, ranked by the piece's score. Three details make it exact:

- Spaces: sentencepiece writes a space as '▁' inside its pieces; here the pieces hold real spaces instead, so
  no normalizer is needed and a literal '▁' in the text is just a character without a piece, which falls
  back to its three bytes, exactly what Tokenizer.encode does with it.
- No pre-tokenizer: sentencepiece does not cut the text into words either (its pieces simply never span
  a space boundary, except the whitespace-only ones, which the merges cover).
- Special tokens are added tokens (single ids). One difference is transformers' convention: text that
  spells a special token ("<|bos|>", "<unk>") is read as that token unless `split_special_tokens=True`;
  our Tokenizer never reads text as a special token.

tokenizer(text) prepends <|bos|> (a post-processor), as every document in training began with it; the
chat template writes its own <|bos|>, and chat templates are tokenized without added special tokens.
"""

from __future__ import annotations

import json

from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, processors

from llm.tokenizer import SPACE_MARK, SPECIAL_TOKENS

_Type = spm_pb2.ModelProto.SentencePiece.Type
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]
EOS_TOKEN = "<|assistant_end|>"  # what ends an assistant turn; the engine also stops at <|bos|>
BOS_TOKEN = "<|bos|>"


def read_proto(model_bytes: bytes) -> spm_pb2.ModelProto:
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def check_exportable(proto: spm_pb2.ModelProto) -> None:
    """The settings the equivalence above rests on (Tokenizer.train always writes them)."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    settings = {"model_type": (trainer.model_type, spm_pb2.TrainerSpec.BPE),
                "byte_fallback": (trainer.byte_fallback, True),
                "treat_whitespace_as_suffix": (trainer.treat_whitespace_as_suffix, False),
                "add_dummy_prefix": (norm.add_dummy_prefix, False),
                "remove_extra_whitespaces": (norm.remove_extra_whitespaces, False),
                "escape_whitespaces": (norm.escape_whitespaces, True), "normalization": (norm.name, "identity")}
    for name, (value, needed) in settings.items():
        if value != needed:
            raise ValueError(f"this sentencepiece model has {name}={value!r}; a tokenizer.json encodes the same "
                             f"only for {name}={needed!r} (as `python -m llm.train_tokenizer` trains)")


def _hf_piece(piece: spm_pb2.ModelProto.SentencePiece) -> str:
    return piece.piece.replace(SPACE_MARK, " ") if piece.type == _Type.NORMAL else piece.piece


def bpe_merges(vocab: dict[str, int], normal: set[str]) -> list[tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, the best piece (lowest id) first; splits of
    one piece ordered by their parts' ids. (sentencepiece breaks a tie between two splits of one piece by
    position, a merge list by rank; they can only disagree when the two pairs overlap, as in x|xx|x, which
    leftmost-first merging of a BPE vocabulary does not produce in practice: the tests compare random text.)"""
    merges = []
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def _check_scores(proto: spm_pb2.ModelProto) -> None:
    """sentencepiece merges by score; the merge list ranks by id. They agree when scores fall as ids rise."""
    scores = [p.score for p in proto.pieces if p.type == _Type.NORMAL]
    if any(a <= b for a, b in zip(scores, scores[1:])):
        raise ValueError("this sentencepiece model's piece scores do not decrease with the piece id, so its merge "
                         "order cannot be written as a tokenizer.json merge list")


def build(model_bytes: bytes) -> HFTokenizer:
    """The `tokenizers` equivalent of a sentencepiece model made by Tokenizer.train."""
    proto = read_proto(model_bytes)
    check_exportable(proto)
    _check_scores(proto)
    vocab = {_hf_piece(p): i for i, p in enumerate(proto.pieces)}
    normal = {_hf_piece(p) for p in proto.pieces if p.type == _Type.NORMAL}
    unk = unk_piece(proto)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=bpe_merges(vocab, normal), unk_token=unk, byte_fallback=True,
                                 fuse_unk=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, *SPECIAL_TOKENS)])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1",
                                                       special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])])
    return tok


def unk_piece(proto: spm_pb2.ModelProto) -> str:
    return next(p.piece for p in proto.pieces if p.type == _Type.UNKNOWN)


def special_token_ids(model_bytes: bytes) -> dict[str, int]:
    """config.json's ids. pad is <unk>, an id encode never produces, so transformers' padding_idx (whose
    embedding row gets no gradient) never freezes a token the model uses."""
    proto = read_proto(model_bytes)
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    return {"bos_token_id": ids[BOS_TOKEN], "eos_token_id": ids[EOS_TOKEN], "pad_token_id": ids[unk_piece(proto)]}


def tokenizer_config(model_max_length: int, unk: str = "<unk>") -> dict:
    """tokenizer_config.json: the generic fast tokenizer over tokenizer.json, and which token plays which role."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map(unk),
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "model_max_length": model_max_length,
    }


def special_tokens_map(unk: str = "<unk>") -> dict:
    others = [t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN)]
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": unk, "pad_token": unk,
            "additional_special_tokens": others}


# ----------------------------------------------------------------------------- tokenizer.json -> sentencepiece


def _refuse(why: str) -> ValueError:
    return ValueError(f"this tokenizer.json cannot be expressed as our sentencepiece tokenizer: {why}")


def _check_pipeline(data: dict) -> None:
    if data.get("normalizer") is not None:
        raise _refuse(f"it has a normalizer ({data['normalizer'].get('type')}); ours changes no text before encoding")
    if data.get("pre_tokenizer") is not None:
        raise _refuse(f"it has a pre-tokenizer ({data['pre_tokenizer'].get('type')}, e.g. a byte-level or regex "
                      f"split); ours merges over the whole text, cut only at special tokens")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(f"its model is {model.get('type')!r}, not a BPE")
    if not model.get("byte_fallback"):
        raise _refuse("its BPE has no byte fallback; ours encodes unknown characters as their UTF-8 bytes")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _refuse(f"its BPE sets {key}={model[key]!r}")
    if model.get("ignore_merges"):
        raise _refuse("its BPE sets ignore_merges (whole words looked up before merging)")


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:
        pair = tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" "))
        if len(pair) != 2:
            raise _refuse(f"merge {m!r} is not a pair of pieces")
        pairs.append(pair)
    return pairs


def _pieces(data: dict) -> list[spm_pb2.ModelProto.SentencePiece]:
    vocab: dict[str, int] = data["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise _refuse("its vocabulary ids are not 0..N-1 without gaps")
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    unk = data["model"].get("unk_token")
    for name in SPECIAL_TOKENS:
        if name not in vocab or not added.get(name, {}).get("special"):
            raise _refuse(f"it lacks the special token {name!r} (ours has {', '.join(SPECIAL_TOKENS)})")
    extra = sorted(set(added) - set(SPECIAL_TOKENS) - {unk})
    if extra:
        raise _refuse(f"it has added tokens {extra[:5]} besides ours ({', '.join(SPECIAL_TOKENS)})")
    missing_bytes = [b for b in BYTE_PIECES if b not in vocab]
    if missing_bytes or unk not in vocab:
        raise _refuse(f"byte fallback needs <unk> and the 256 byte tokens <0x00>..<0xFF>; missing "
                      f"{([unk] if unk not in vocab else []) + missing_bytes[:5]}")
    types = {unk: _Type.UNKNOWN, **{t: _Type.CONTROL for t in SPECIAL_TOKENS}, **{b: _Type.BYTE for b in BYTE_PIECES}}
    pieces, rank = [], 0
    for text in sorted(vocab, key=vocab.get):
        piece = spm_pb2.ModelProto.SentencePiece(piece=text, type=types.get(text, _Type.NORMAL))
        if piece.type == _Type.NORMAL:
            if SPACE_MARK in text:
                raise _refuse(f"piece {text!r} holds '{SPACE_MARK}', which our tokenizer reserves for spaces")
            piece.piece, piece.score = text.replace(" ", SPACE_MARK), -float(rank)
            rank += 1
        pieces.append(piece)
    return pieces


def to_sentencepiece(data: dict) -> bytes:
    """A sentencepiece model that encodes as this tokenizer.json does, or ValueError saying why there is none.

    A tokenizer.json qualifies when it is exactly what `build` writes for some sentencepiece model: the
    pipeline above and a merge list that is every split of every piece, in vocabulary order."""
    _check_pipeline(data)
    proto = spm_pb2.ModelProto()
    proto.pieces.extend(_pieces(data))
    vocab = data["model"]["vocab"]
    normal = {_hf_piece(p) for p in proto.pieces if p.type == _Type.NORMAL}
    expected = bpe_merges(vocab, normal)
    given = _merge_pairs(data["model"].get("merges", []))
    if given != expected:
        first = next((i for i, (a, b) in enumerate(zip(given, expected)) if a != b), min(len(given), len(expected)))
        raise _refuse(f"its merges are not every split of every piece in vocabulary order (first difference at "
                      f"merge {first}: {given[first:first + 1]} vs {expected[first:first + 1]}), so sentencepiece "
                      f"would merge differently")
    trainer = proto.trainer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = spm_pb2.TrainerSpec.BPE, len(vocab), True
    trainer.unk_id = vocab[data["model"]["unk_token"]]
    trainer.bos_id = trainer.eos_id = trainer.pad_id = -1
    trainer.control_symbols.extend(SPECIAL_TOKENS)
    norm = proto.normalizer_spec
    norm.name, norm.precompiled_charsmap = "identity", b""
    norm.add_dummy_prefix = norm.remove_extra_whitespaces = False
    return proto.SerializeToString(deterministic=True)


def same_pieces(a: bytes, b: bytes) -> bool:
    """Whether two sentencepiece models have the same pieces, kinds and scores (so they encode the same)."""
    key = lambda m: [(p.piece, p.type, p.score) for p in read_proto(m).pieces]  # noqa: E731
    return key(a) == key(b)


def load_json(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _refuse(f"it is not valid JSON ({e})") from e
