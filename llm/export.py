"""python -m llm.export source=<stage|artifact folder> out=<dir> [overwrite=true]

Writes the artifact as a transformers NanoChat folder (llm.huggingface.folder): load it with
AutoModelForCausalLM / AutoTokenizer.from_pretrained(out), serve it with `vllm serve out`, push it with
`hf upload <repo> out`. A model shape NanoChat cannot hold fails before anything is written.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

import llm.config  # noqa: F401  (registers the resolvers the configs use)
from llm.artifact import resolve_artifact
from llm.config import absolute
from llm.errors import one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from llm.huggingface.folder import export_folder  # needs the hf extra (tokenizers)

    started = time.time()
    with one_line_errors():  # a damaged artifact: one line naming the file and the fix
        folder = resolve_artifact(cfg.source, absolute(cfg.paths.artifacts))
        out = export_folder(folder, absolute(cfg.out), overwrite=bool(cfg.overwrite))
    print(f"exported {folder} -> {out} in {time.time() - started:.1f}s\n"
          f"  transformers: AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
          f"  vLLM:         vllm serve {out}\n"
          f"  hub:          hf upload <user>/<repo> {out}")


if __name__ == "__main__":
    main()
