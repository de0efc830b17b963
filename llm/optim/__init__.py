"""Optimizers: Muon + AdamW in one optimizer (muon), param grouping (groups), lr/momentum schedules."""

from llm.optim.groups import OptimizerConfig, build_optimizer, build_param_groups
from llm.optim.muon import MuonAdamW, zeropower_via_newtonschulz5
from llm.optim.schedule import apply_schedule, lr_multiplier, muon_momentum

__all__ = [
    "MuonAdamW", "OptimizerConfig", "apply_schedule", "build_optimizer", "build_param_groups",
    "lr_multiplier", "muon_momentum", "zeropower_via_newtonschulz5",
]
