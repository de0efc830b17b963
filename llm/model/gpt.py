"""The GPT model: a decoder-only Transformer in pure PyTorch (no Lightning, no Hydra).

Modelled on nanochat's gpt.py:
- rotary position embeddings (or learned absolute ones, for a GPT-2-like variant)
- QK-norm; parameter-free RMSNorm after the embedding, before attention/MLP and before lm_head
- ReLU^2 MLP (or GELU), no biases anywhere
- untied embedding / lm_head (or tied), logit soft-capping
- grouped-query attention (n_kv_head < n_head), static KV cache for decoding

Parameter names are a contract: FSDP2 shards each element of `blocks`; optimizer grouping treats
every 2-D parameter inside `blocks` as a matrix, `wte`/`wpe` as embeddings and `lm_head` as the
unembedding (absent from named_parameters when tied, since it *is* wte.weight).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.model.fused_loss import linear_cross_entropy
from llm.model.kv_cache import KVCache

POSITIONS = ("rope", "learned")
MLPS = ("relu2", "gelu")
REDUCTIONS = ("mean", "sum", "none")
ROTARY_OVERCOMPUTE = 10  # rotary tables cover 10x sequence_len so generation can run past training length


@dataclass
class GPTConfig:
    vocab_size: int = 32768
    sequence_len: int = 2048
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 6
    n_kv_head: int = 6  # grouped-query attention when < n_head
    positions: str = "rope"  # "rope" | "learned" (absolute, nn.Embedding(sequence_len, n_embd))
    mlp: str = "relu2"  # "relu2" | "gelu"; hidden width 4 * n_embd
    tie_embeddings: bool = False  # lm_head shares wte's weight
    logit_softcap: float | None = 15.0  # softcap * tanh(logits / softcap); None disables
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "sequence_len", "n_layer", "n_embd", "n_head", "n_kv_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r} is not one of {POSITIONS}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp={self.mlp!r} is not one of {MLPS}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"pick n_head dividing the width (or use model=dNN)"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: "
                f"each key/value head must serve a whole group of query heads (try n_kv_head={self.n_head})"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} (n_embd={self.n_embd} / n_head={self.n_head}) is odd, "
                f"but rotary embeddings rotate pairs of channels: choose an even head_dim or positions='learned'"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r} must be true or false")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap={self.logit_softcap!r} must be > 0, or None to disable soft-capping")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be > 0 (10000 is the usual base)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "GPTConfig":
        """The depth dial: one integer sizes the model, as in nanochat.

        n_layer = depth, n_embd = 64 * depth, heads of 128 channels: n_head = max(2, n_embd // 128),
        so widths under 256 get two smaller heads instead of one (d2: 128 wide = 2 heads of 64).
        n_kv_head = n_head (no GQA). Every other field, or any of these, comes from `overrides` (a None
        override keeps the dial's value, so a config can list every field).
        Examples: d4 -> 4 layers, 256 wide, 2 heads of 128; d20 -> 20 layers, 1280 wide, 10 heads.
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth={depth!r} must be an integer >= 1 (model=d2, d4, ..., d20, ...)")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"unknown GPTConfig field(s) {sorted(unknown)}; valid fields are: {fields}")
        sized = {name: overrides.pop(name) for name in ("n_layer", "n_embd", "n_head", "n_kv_head")
                 if overrides.get(name) is not None}
        sized.setdefault("n_layer", depth)
        sized.setdefault("n_embd", 64 * depth)
        sized.setdefault("n_head", max(2, sized["n_embd"] // 128))
        sized.setdefault("n_kv_head", sized["n_head"])
        return cls(**{**{k: v for k, v in overrides.items() if k not in sized}, **sized})


def norm(x: torch.Tensor) -> torch.Tensor:
    # RMSNorm without a learnable gain: nothing to tune, nothing to shard.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (B, T, H, D) by position-dependent angles."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    # cos/sin are float32, so the rotation is computed in float32 and cast back once.
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H_kv, S, D); mask None means causal (T > 1) or full (T == 1)."""
    B, H, T, D = q.shape
    H_kv = k.size(1)
    if k.dtype != q.dtype:  # e.g. an fp32 cache read under bf16 autocast
        k, v = k.to(q.dtype), v.to(q.dtype)
    if T == 1 and H_kv != H:
        # Decoding with GQA: the H/H_kv query heads that share a K/V head become that head's
        # "query length", so SDPA never has to repeat the cached K/V (exact, and no allocation).
        y = F.scaled_dot_product_attention(q.reshape(B, H_kv, H // H_kv, D), k, v, attn_mask=mask)
        return y.reshape(B, H, 1, D)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=H_kv != H
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, mask, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if cos_sin is not None:
            q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = attend(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.act = config.mlp
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square() if self.act == "relu2" else F.gelu(x)
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, mask, kv_cache):
        x = x + self.attn(norm(x), cos_sin, mask, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.sequence_len, config.n_embd) if config.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Rotary tables are cheap, so they are derived state (non-persistent), never checkpointed.
        self.max_positions = (
            ROTARY_OVERCOMPUTE * config.sequence_len if config.positions == "rope" else config.sequence_len
        )
        cos, sin = self._rotary_tables(self.wte.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # Compiled runs set this: the output layer's loss then runs as one C++ kernel on CPU
        # (llm/model/cpu_loss_kernel.py), which needs the compiler that torch.compile needs anyway.
        self.cpu_loss_kernel = False
        # On the meta device there is nothing to initialise yet: to_empty() then init_weights().
        if self.wte.weight.device.type != "meta":
            self.init_weights()

    def _rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (max_positions, head_dim/2) cos and sin tables (empty for learned positions)."""
        if self.config.positions != "rope":
            return torch.empty(0, device=device), torch.empty(0, device=device)
        head_dim = self.config.head_dim
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.config.rope_theta ** (channels / head_dim))
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init; separate from __init__ so a meta-device model can be materialised later.

        Linear: normal, std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)). Residual output
        projections (attn and MLP c_proj) and an untied lm_head start at zero, so every block starts
        as the identity and the initial logits are exactly 0 (uniform prediction).
        Embeddings: normal std 1.0 (the norm after the embedding makes the scale irrelevant to the
        forward pass). Tied: std 1/sqrt(n_embd), since the same matrix also produces the logits
        and std 1.0 would start them at ~sqrt(n_embd). Learned positions get the same std as wte.
        """
        if self.config.tie_embeddings and self.lm_head.weight is not self.wte.weight:
            self.lm_head.weight = self.wte.weight  # module.to_empty() can untie shared parameters
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
        emb_std = self.config.n_embd ** -0.5 if self.config.tie_embeddings else 1.0
        nn.init.normal_(self.wte.weight, mean=0.0, std=emb_std)
        if self.wpe is not None:
            nn.init.normal_(self.wpe.weight, mean=0.0, std=emb_std)
        if not self.config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)
        for block in self.blocks:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.cos, self.sin = self._rotary_tables(self.wte.weight.device)

    def _check_input(self, idx: torch.Tensor, kv_cache: KVCache | None) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx has shape {tuple(idx.shape)}; expected (batch, time) token ids")
        T = idx.size(1)
        end = T if kv_cache is None else kv_cache.pos + T
        if end > self.max_positions:
            raise ValueError(
                f"position {end - 1} is past the model's limit of {self.max_positions} positions "
                f"({self.config.positions} positions, sequence_len={self.config.sequence_len}); use shorter inputs"
            )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        reduction: str = "mean",
        loss_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 (float64 for a float64 model), or the cross-entropy loss when
        targets are given.

        With a kv_cache, this chunk's keys/values are appended to it and attention covers everything
        cached; positions continue from the cache (per row, so left-padded rows are right).
        loss_weights (B, T) scale each token's loss before a "mean"/"sum" reduction (e.g. RL advantages).
        """
        self._check_input(idx, kv_cache)
        B, T = idx.shape
        # (T,) positions without a cache; (B, T) per-row ones with it.
        pos = torch.arange(T, device=idx.device) if kv_cache is None else kv_cache.positions(T)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        cos_sin = None
        if self.config.positions == "rope":
            cos_sin = (self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2))  # broadcast over heads
        mask = kv_cache.attn_mask(T) if kv_cache is not None else None
        x = norm(x)
        for block in self.blocks:
            x = block(x, cos_sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        if targets is not None:
            self._check_targets(x, targets, loss_mask, reduction, loss_weights)
            if loss_mask is not None:
                targets = targets.masked_fill(loss_mask == 0, -1)
            if reduction != "none" or not torch.is_grad_enabled():
                # the loss straight from the hidden states, never holding (B, T, vocab) logits
                return linear_cross_entropy(x, self.lm_head.weight, targets, self.config.logit_softcap, reduction,
                                            loss_weights, cpu_kernel=self.cpu_loss_kernel)
        logits = self.lm_head(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32, or float64 as computed
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        # per-token losses that need gradients: the plain path
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1,
                               reduction="none").view(targets.shape)

    @staticmethod
    def _check_targets(x, targets, loss_mask, reduction, loss_weights) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
        if targets.shape != x.shape[:-1]:
            raise ValueError(f"targets have shape {tuple(targets.shape)}; expected {tuple(x.shape[:-1])} like idx")
        for name, value in (("loss_mask", loss_mask), ("loss_weights", loss_weights)):
            if value is not None and value.shape != targets.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {tuple(targets.shape)} like targets")
        if loss_weights is not None and reduction == "none":
            raise ValueError("loss_weights scale a reduced loss: use reduction='sum' or 'mean', "
                             "or multiply the per-token losses of reduction='none' yourself")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of (unique) parameters; exclude_embeddings drops wte and wpe (a tied lm_head too)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.wte.weight.numel()
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
        return total

    def flops_per_token(self) -> float:
        """nanochat's (PaLM-style) estimate of training FLOPs per token, forward + backward.

        6 * N for the matmuls, N = non-embedding parameters *including* lm_head (a lookup costs no
        FLOPs, the unembedding matmul does, tied or not), plus 12 * n_layer * n_head * head_dim *
        sequence_len for the attention scores and weighted sums.
        """
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_embeddings:
            n += self.lm_head.weight.numel()
        return float(6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len)

    @torch.no_grad()
    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> KVCache:
        """A KVCache shaped for this model. max_len defaults to sequence_len; the dtype defaults to
        the autocast dtype when autocast is on for the device, else the parameters' dtype."""
        device = torch.device(device) if device is not None else self.wte.weight.device
        max_len = self.config.sequence_len if max_len is None else max_len
        if max_len > self.max_positions:
            raise ValueError(
                f"max_len={max_len} exceeds the model's {self.max_positions} positions "
                f"({self.config.positions}, sequence_len={self.config.sequence_len}); use max_len <= {self.max_positions}"
            )
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.wte.weight.dtype
        c = self.config
        return KVCache(batch_size, max_len, c.n_layer, c.n_kv_head, c.head_dim, dtype=dtype, device=device)
