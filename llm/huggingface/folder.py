"""Writing an exported transformers folder from an artifact, and reading one back into an artifact.

    <out>/config.json              NanoChatConfig (config.py)
          generation_config.json   stops at assistant_end or bos, as our engine does
          model.safetensors        transformers' parameter names (weights.py)
          tokenizer.json           the `tokenizers` BPE (tokenizer_json.py) + tokenizer_config.json,
          special_tokens_map.json  special_tokens_map.json, chat_template.jinja (chat_template.py)
          tokenizer.model          the sentencepiece model it was built from: an import restores the very
                                   same tokenizer (same fingerprint) instead of rebuilding it
          README.md                the model card (model_card.py)

Both directions build the whole folder under a temporary name beside the destination and rename it into
place, so a crash never leaves a half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from google.protobuf.message import DecodeError
from safetensors.torch import save_file

from llm.artifact import load_artifact, read_meta, read_metrics, save_artifact
from llm.huggingface import config as hf_config
from llm.huggingface import tokenizer_json, weights
from llm.huggingface.chat_template import CHAT_TEMPLATE
from llm.huggingface.model_card import model_card
from llm.model.gpt import GPTConfig
from llm.tokenizer import MODEL_FILENAME, Tokenizer


@contextmanager
def atomic_folder(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path`; renames it onto `path` only if the block succeeds."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another destination or pass overwrite=true")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():  # overwrite: move the old folder aside first, so `path` is never half of each
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "folder")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_folder(artifact: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the transformers NanoChat folder of an artifact folder; unsupported shapes fail before any file."""
    hf_config.check_exportable(GPTConfig(**read_meta(artifact)["model"]))
    model, tokenizer, meta = load_artifact(artifact)  # checks every file first (llm.artifact.check_artifact)
    model_bytes = (artifact / MODEL_FILENAME).read_bytes()
    hf_tokenizer = tokenizer_json.build(model_bytes)  # refuses a tokenizer it cannot write exactly
    config, ids = model.config, tokenizer_json.special_token_ids(model_bytes)
    metrics = read_metrics(artifact)
    with atomic_folder(out, overwrite) as tmp:
        save_file(weights.to_hf_state(model.state_dict(), config), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config.to_hf_config(config, ids, next(model.parameters()).dtype))
        _write_json(tmp / "generation_config.json", {  # stop where our engine stops
            "bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"],
            "eos_token_id": [ids["eos_token_id"], ids["bos_token_id"]]})
        _write_tokenizer(tmp, model_bytes, hf_tokenizer, config.sequence_len)
        (tmp / "README.md").write_text(model_card(config, meta["stage"], metrics, tokenizer.fingerprint()),
                                       encoding="utf-8")
    return out


def _write_tokenizer(folder: Path, model_bytes: bytes, hf_tokenizer, model_max_length: int) -> None:
    unk = tokenizer_json.unk_piece(tokenizer_json.read_proto(model_bytes))
    hf_tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", tokenizer_json.tokenizer_config(model_max_length, unk))
    _write_json(folder / "special_tokens_map.json", tokenizer_json.special_tokens_map(unk))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (folder / MODEL_FILENAME).write_bytes(model_bytes)


def read_tokenizer(folder: Path) -> tuple[Tokenizer, str | None]:
    """Our tokenizer of a transformers folder, from its tokenizer.json (ValueError saying why not), and a note
    when a tokenizer.model beside it was set aside because it is not the same tokenizer."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}: a transformers folder needs one to be imported")
    rebuilt = tokenizer_json.to_sentencepiece(tokenizer_json.load_json(path.read_text(encoding="utf-8")))
    original = folder / MODEL_FILENAME
    if not original.exists():
        return Tokenizer(rebuilt), None
    try:
        same = tokenizer_json.same_pieces(original.read_bytes(), rebuilt)
    except DecodeError:  # not a sentencepiece model at all
        same = False
    if same:
        return Tokenizer(original.read_bytes()), None  # the very file the export started from
    return Tokenizer(rebuilt), f"{original} is not the tokenizer tokenizer.json describes: rebuilt from tokenizer.json"


def import_folder(folder: Path, dest: Path, stage: str, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Turn a transformers NanoChat folder into an artifact folder at `dest`; returns it and the notes
    (what mapped only approximately). Config and tokenizer are checked before any weight is read."""
    from transformers import AutoConfig  # the hf extra: it fills in the defaults a hub config.json leaves out

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {folder}: give the folder of a transformers checkpoint")
    hf = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    config, notes = hf_config.from_hf_config(hf)
    tokenizer, note = read_tokenizer(folder)
    notes += [note] if note else []
    if config.vocab_size != tokenizer.vocab_size:  # an artifact's model and tokenizer agree (llm.artifact)
        raise ValueError(f"config.json has vocab_size={config.vocab_size} but tokenizer.json {tokenizer.vocab_size} "
                         f"tokens: our artifacts need the two equal (a padded vocabulary is not supported)")
    state = weights.from_hf_state(weights.read_safetensors(folder), config)
    with atomic_folder(dest, overwrite) as tmp:
        # a fresh folder (save_artifact would carry an old folder's checkpoints over); provenance in "config"
        save_artifact(tmp, state, config, tokenizer, stage, metrics={},
                      extra={"config": {"import_hf": {"path": str(folder), "notes": notes}}})
    return dest, notes
