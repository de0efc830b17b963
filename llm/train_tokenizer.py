"""python -m llm.train_tokenizer: train the sentencepiece BPE tokenizer on a text source.

Learns from the source's training documents (those after the first data.val_docs), then measures
bytes per token on the held-out documents — per bundled source when the source is the bundled
corpus — and writes tokenizer.model and compression.json to <artifacts>/tokenizer/.
"""

from __future__ import annotations

import time
from dataclasses import replace

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from llm.artifact import write_json
from llm.config import absolute
from llm.data.sources import TextSource, iter_texts
from llm.errors import one_line_errors
from llm.tokenizer import Tokenizer


def heldout_sets(source: TextSource, heldout_docs: int) -> dict[str, list[str]]:
    """The held-out documents, split by bundled source when there are several."""
    if source.kind != "bundled":
        return {source.name or "files": list(iter_texts(source, 0, heldout_docs))}
    from llm.data.corpus import available_sources
    return {name: list(iter_texts(replace(source, corpus=[name]), 0, heldout_docs))
            for name in (source.corpus or available_sources())}


def train_tokenizer(cfg: DictConfig) -> dict:
    source: TextSource = instantiate(cfg.data.source)
    heldout_docs = int(cfg.data.val_docs)
    out_dir = absolute(cfg.out_dir)
    started = time.time()
    tokenizer = Tokenizer.train(iter_texts(source, start=heldout_docs), vocab_size=int(cfg.vocab_size),
                                out_dir=out_dir, max_chars=int(cfg.max_chars), num_threads=int(cfg.num_threads))
    report = {
        "vocab_size": tokenizer.vocab_size,
        "train_seconds": round(time.time() - started, 1),
        "bytes_per_token": tokenizer.compression_report(heldout_sets(source, heldout_docs)),
    }
    write_json(out_dir / "compression.json", report)
    print(f"tokenizer: {out_dir} vocab={tokenizer.vocab_size} trained in {report['train_seconds']}s")
    for name, ratio in report["bytes_per_token"].items():
        print(f"  {name:>24}: {ratio:.3f} bytes/token (held out)")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="tokenizer")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        train_tokenizer(cfg)


if __name__ == "__main__":
    main()
