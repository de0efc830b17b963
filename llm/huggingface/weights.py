"""Our parameter names <-> transformers NanoChat's. Same tensors, same layouts (nn.Linear's (out, in)), so the
mapping is a renaming; RMSNorm has no weights on either side, and rotary tables are derived, not stored.

    wte.weight                       model.embed_tokens.weight
    blocks.{i}.attn.c_q/c_k/c_v      model.layers.{i}.self_attn.q_proj/k_proj/v_proj
    blocks.{i}.attn.c_proj           model.layers.{i}.self_attn.o_proj
    blocks.{i}.mlp.c_fc/c_proj       model.layers.{i}.mlp.fc1/fc2
    lm_head.weight                   lm_head.weight  (left out when tied: transformers re-ties it on load)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from llm.model.gpt import GPT, GPTConfig

_LAYER = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
          "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.weight")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_TOP = {"wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """transformers' name for one of our parameters."""
    if name in _TOP:
        return _TOP[name]
    match = _BLOCK.fullmatch(name)
    if not match or match.group(2) not in _LAYER:
        raise ValueError(f"parameter {name!r} has no place in transformers' NanoChat")
    return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}.weight"


def to_hf_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' names (contiguous CPU tensors, ready for safetensors)."""
    return {hf_name(k): v.detach().to("cpu").contiguous() for k, v in state.items()
            if not (config.tie_embeddings and k == "lm_head.weight")}


def from_hf_state(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """transformers' NanoChat weights under our names, in float32 (our master-weight dtype; float32 and
    bfloat16 weights convert exactly). Every expected tensor must be there with its shape, and nothing else."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]  # the same tensor as wte.weight
    ours = {hf_name(k): k for k in shapes}
    extra = set(hf_state) - set(ours) - ({"lm_head.weight"} if config.tie_embeddings else set())
    if extra:
        raise ValueError(f"the checkpoint has weights our GPT has no place for: {sorted(extra)[:5]} (our RMSNorm has "
                         f"no gain and nothing has a bias): it is not the NanoChat architecture config.json says")
    missing = sorted(set(ours) - set(hf_state))
    if missing:
        raise ValueError(f"the checkpoint lacks weights {missing[:5]}: its safetensors files are incomplete or do not "
                         f"match config.json")
    state = {}
    for theirs, name in ours.items():
        tensor = hf_state[theirs]
        if tensor.shape != shapes[name]:
            raise ValueError(f"weight {theirs} has shape {tuple(tensor.shape)} but config.json implies "
                             f"{tuple(shapes[name])}")
        state[name] = tensor.to(torch.float32)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers folder: model.safetensors, or the shards model.safetensors.index.json names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (f" (found {found}: pickled weights are not read; re-save them with transformers' "
            f"save_pretrained(..., safe_serialization=True))" if found else "")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}{hint}")
