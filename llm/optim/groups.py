"""
Which parameter is trained by which rule, at which learning rate (as nanochat's setup_optimizers).

    group          params                                   rule            lr (all times lr_scale)
    matrix         every 2-D weight inside model.blocks     Muon (AdamW*)   matrix_lr
    embedding      model.wte (+ model.wpe)                  AdamW           embedding_lr   * s
    unembedding    model.lm_head, when untied               AdamW           unembedding_lr * s
    tied_embedding wte.weight when lm_head.weight is it     AdamW           unembedding_lr * s
    scalar         every 0-D / 1-D param anywhere           AdamW           scalar_lr

    s = (n_embd / 768) ** -0.5        (* AdamW at matrix_lr * s when cfg.name == "adamw")
    lr_scale: the stage's fraction of the optimizer's rates (nanochat's init_lr_frac: conf/stage/sft.yaml
    sets optimizer.lr_scale=0.02); every scaling of a learning rate happens here, the schedule
    (llm/optim/schedule.py) then multiplies over time.

Choices (nanochat is silent on them):
- Width scaling s applies to the AdamW groups holding matrices (their Adam step size per element
  should shrink as the matrix widens); scalars have a width-independent size, so scalar_lr is
  used as given, as in nanochat. Muon needs no scaling: its update is already normalised.
- A tied embedding (gpt2-style) gets unembedding_lr: the same tensor is the output layer, and
  the output layer is what diverges at embedding_lr (0.2); gpt2-style runs train stably at it.
- weight_decay applies to the matrix group only (as in nanochat); embeddings and scalars get 0.
- name == "adamw" still returns a MuonAdamW (every group kind="adamw"): one optimizer class,
  one state_dict format, one schedule helper.

Build the optimizer after FSDP2 sharding: grouping is by module attribute and tensor identity,
which holds for the DTensor parameters `fully_shard` installs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm.optim.muon import MuonAdamW

OPTIMIZER_NAMES = ("muon_adamw", "adamw")


@dataclass
class OptimizerConfig:
    """Instantiated from conf/optimizer/*.yaml (every value lives there; the stages set lr_scale)."""

    name: str  # "muon_adamw" | "adamw"
    matrix_lr: float  # Muon lr for hidden matrices (or AdamW lr for them when name == "adamw")
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float
    weight_decay: float
    adam_betas: tuple[float, float]
    adam_eps: float
    muon_momentum: float
    muon_momentum_warmup_start: float
    muon_momentum_warmup_steps: int
    lr_scale: float  # times every learning rate above

    def __post_init__(self):
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer name={self.name!r}; use one of {OPTIMIZER_NAMES}")
        betas = tuple(float(b) for b in self.adam_betas)  # YAML gives a list (or ListConfig)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas={list(self.adam_betas)}; give two values in [0, 1), e.g. [0.8, 0.95]")
        self.adam_betas = betas
        for field in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field}={getattr(self, field)} is negative; use a value >= 0")
        if not self.lr_scale > 0:
            raise ValueError(f"optimizer.lr_scale={self.lr_scale}: use a positive fraction of the optimizer's "
                             f"rates, e.g. 0.02")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps={self.adam_eps}; use a small positive value such as 1e-10")
        for field in ("muon_momentum", "muon_momentum_warmup_start"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{field}={getattr(self, field)}; use a value in [0, 1), e.g. 0.95")
        if self.muon_momentum_warmup_steps < 0:
            raise ValueError(
                f"muon_momentum_warmup_steps={self.muon_momentum_warmup_steps}; use >= 0 (0 = no warmup)"
            )


def _module_params(model: nn.Module, attr: str) -> list[nn.Parameter]:
    module = getattr(model, attr, None)
    return list(module.parameters()) if module is not None else []


def _classify(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split model parameters into the named groups of the table above, by tensor identity."""
    for attr in ("wte", "blocks", "lm_head", "config"):
        if getattr(model, attr, None) is None:
            raise ValueError(f"{type(model).__name__} has no `{attr}`; build_optimizer expects the GPT layout")
    embedding = _module_params(model, "wte") + _module_params(model, "wpe")
    tied = model.lm_head.weight is model.wte.weight
    head = [] if tied else _module_params(model, "lm_head")
    block_params = {id(p) for p in model.blocks.parameters()}
    groups: dict[str, list[nn.Parameter]] = {
        "matrix": [], "embedding": [], "unembedding": head, "tied_embedding": [], "scalar": []
    }
    for p in embedding:
        groups["tied_embedding" if tied and p is model.wte.weight else "embedding"].append(p)

    claimed = {id(p) for p in embedding + head}
    for name, p in model.named_parameters():  # yields a shared (tied) tensor only once
        if id(p) in claimed:
            continue
        if p.ndim < 2:
            groups["scalar"].append(p)
        elif id(p) in block_params and p.ndim == 2:
            groups["matrix"].append(p)
        else:
            raise ValueError(
                f"parameter {name!r} (shape {tuple(p.shape)}) fits no optimizer group: only 2-D "
                "weights inside `blocks`, wte/wpe/lm_head and 0-D/1-D params are known; "
                "extend llm/optim/groups.py for it"
            )
    _check_partition(model, groups)
    return groups


def _check_partition(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> None:
    """Every parameter in exactly one group, and nothing that is not a parameter of the model."""
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, str] = {}
    for group, params in groups.items():
        for p in params:
            if id(p) in owner:
                raise ValueError(f"parameter {names.get(id(p))!r} is in both {owner[id(p)]!r} and {group!r}")
            owner[id(p)] = group
    missing = [n for i, n in names.items() if i not in owner]
    extra = [group for group, ps in groups.items() for p in ps if id(p) not in names]
    if missing or extra:
        raise ValueError(f"optimizer groups do not cover the model: missing={missing}, foreign params in {extra}")


def build_param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """The param-group dicts for MuonAdamW: each with kind, name, params, lr, initial_lr."""
    width_scale = (model.config.n_embd / 768) ** -0.5
    scale = cfg.lr_scale  # applied before the width scaling (the order is kept for bit-identical runs)
    betas, eps = tuple(cfg.adam_betas), cfg.adam_eps
    adamw = dict(kind="adamw", betas=betas, eps=eps, weight_decay=0.0)
    if cfg.name == "muon_adamw":
        matrix = dict(kind="muon", lr=cfg.matrix_lr * scale, momentum=cfg.muon_momentum, nesterov=True, ns_steps=5)
    else:
        matrix = dict(adamw, lr=cfg.matrix_lr * scale * width_scale)
    settings = {
        "matrix": dict(matrix, weight_decay=cfg.weight_decay),
        "embedding": dict(adamw, lr=cfg.embedding_lr * scale * width_scale),
        "unembedding": dict(adamw, lr=cfg.unembedding_lr * scale * width_scale),
        "tied_embedding": dict(adamw, lr=cfg.unembedding_lr * scale * width_scale),
        "scalar": dict(adamw, lr=cfg.scalar_lr * scale),
    }
    groups = []
    for name, params in _classify(model).items():
        if params:  # no empty groups: they would clutter logs and state_dicts
            groups.append(dict(settings[name], name=name, params=params, initial_lr=settings[name]["lr"]))
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """One optimizer for the whole model (see the module docstring for the grouping)."""
    return MuonAdamW(build_param_groups(model, cfg))
