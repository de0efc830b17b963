"""python -m llm.import_hf path=<transformers NanoChat folder> name=<artifact name> [stage=sft]

Turns a local transformers NanoChat checkpoint into an artifact folder (llm.huggingface.folder) at
<paths.artifacts>/<name>, and prints how to continue training from it, chat with it, evaluate and serve it.
A config, weights or tokenizer.json our GPT and Tokenizer cannot express exactly is refused, saying why.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import llm.config  # noqa: F401  (registers the resolvers the configs use)
from llm.config import absolute
from llm.errors import one_line_errors

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "model"  # model=dNN files (config_path below)


@hydra.main(version_base="1.3", config_path="../conf", config_name="import_hf")
def main(cfg: DictConfig) -> None:
    from llm.huggingface.config import model_overrides
    from llm.huggingface.folder import import_folder  # needs the hf extra (transformers, tokenizers)
    from llm.model.gpt import GPTConfig
    from llm.artifact import read_meta

    with one_line_errors():
        dest, notes = import_folder(absolute(cfg.path), absolute(cfg.paths.artifacts) / str(cfg.name),
                                    str(cfg.stage), overwrite=bool(cfg.overwrite))
    for note in notes:
        print(f"note: {note}")
    depths = [int(p.stem[1:]) for p in MODEL_CONFIGS.glob("d*.yaml") if p.stem[1:].isdigit()]
    shape = " ".join(model_overrides(GPTConfig(**read_meta(dest)["model"]), depths))
    print(f"imported {cfg.path} -> {dest}\n"
          f"  train: python -m llm.train stage=sft stage.init_from={dest} tokenizer_dir={dest} {shape}\n"
          f"  chat:  python -m llm.chat source={dest}\n"
          f"  eval:  python -m llm.eval source={dest} tasks=[arc_easy,gsm8k]   (or lm_eval:<task>, bpb, ...)\n"
          f"  serve: python -m llm.serve source={dest}")


if __name__ == "__main__":
    main()
