"""Masked loss of artifacts on the held-out chat conversations (the chat stages' validation set).

    python -m llm.evaluate.chat_loss base sft        # the same conversations for every artifact

The base model never saw the chat format, so this shows what mid-training and SFT bought on the
exact data the chat stages validate on (conf/data/_chat.yaml: val_tasks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from llm.artifact import load_artifact, resolve_artifact
from llm.config import absolute  # also registers the resolvers the configs use

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@torch.no_grad()
def chat_val_loss(folder: Path, artifacts: Path) -> float:
    model, tokenizer, meta = load_artifact(folder)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["stage=sft", "trainer=cpu", f"model.sequence_len={model.config.sequence_len}",
                                f"paths.artifacts={artifacts}"])
    data = instantiate(cfg.data, tokenizer_dir=str(folder), _convert_="all")
    total, count = 0.0, 0
    for batch in data.val_batches():
        targets = batch["targets"]
        total += model(batch["inputs"], targets=targets, reduction="sum").item()
        count += int((targets >= 0).sum())
    return total / max(count, 1)


def main(sources: list[str]) -> None:
    artifacts = absolute(os.environ.get("LLM_HOME", "./artifacts"))
    for source in sources:
        folder = resolve_artifact(source, artifacts)
        print(f"{source:>6}: chat validation loss {chat_val_loss(folder, artifacts):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["base", "sft"])
