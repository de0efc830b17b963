"""python -m llm.report: write <artifacts>/report.md, the report card of every stage run so far.

Tokenizer compression, base (val bpb, CORE), mid / sft / rl (the chat tasks and ChatCORE), wall time
and tokens per stage, the environment, and loss curves drawn from the TensorBoard logs as PNG files
under <artifacts>/report/. Stages not run yet show as missing.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import llm.config  # noqa: F401  (registers the resolvers the configs use)
from llm.config import absolute
from llm.errors import one_line_errors
from llm.reporting.report_card import write_report


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        out = write_report(absolute(cfg.paths.artifacts), absolute(cfg.out), list(cfg.stages), list(cfg.curves))
    print(f"report card: {out}")


if __name__ == "__main__":
    main()
