"""Static key/value cache for incremental decoding.

All K/V memory is allocated once, as (n_layer, B, n_kv_head, max_len, head_dim) tensors; a forward
pass writes its chunk at slots [pos, pos+T) and attends to the views [:pos+T]. Nothing is
concatenated or reallocated per decoded token, which is what makes one-token steps cheap.

Rows of different prompt length are left-padded to a common length: `start[b]` is the first real
slot of row b. Pad slots are masked out as keys, and positions are counted from `start[b]`, so
a left-padded row computes exactly what the same prompt alone would.

Protocol used by GPT.forward, once per call with a chunk of T tokens:
    positions(T) -> per-row position ids       attn_mask(T) -> mask or None
    update(layer, k, v) for every layer        advance(T) after the last layer
"""

from __future__ import annotations

import torch


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"KVCache {name}={value!r} must be a positive integer")


class KVCache:
    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        for name, value in [("batch_size", batch_size), ("max_len", max_len), ("n_layer", n_layer),
                            ("n_kv_head", n_kv_head), ("head_dim", head_dim)]:
            _check_positive_int(name, value)
        self.batch_size, self.max_len, self.n_layer = batch_size, max_len, n_layer
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0
        self.start = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device)
        # (B, 1, 1, max_len) "this slot is a real token" mask; None while no row is padded, so the
        # common unpadded case never builds a mask at all.
        self._key_ok: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def padded(self) -> bool:
        return self._key_ok is not None

    def _check_room(self, T: int) -> None:
        if self.pos + T > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.pos} tokens cached + {T} new = {self.pos + T} > "
                f"max_len={self.max_len}; make the cache with a larger max_len or ask for fewer max_tokens"
            )

    def set_left_padding(self, pad: torch.Tensor | list[int]) -> None:
        """Declare that row b starts with pad[b] padding tokens. Call before the first forward."""
        pad = torch.as_tensor(pad, dtype=torch.long, device=self.device)
        if pad.shape != (self.batch_size,):
            raise ValueError(f"pad has shape {tuple(pad.shape)}; expected ({self.batch_size},), one count per row")
        if self.pos != 0:
            raise ValueError(f"set_left_padding after {self.pos} tokens were cached; call it before the prefill (or reset())")
        lo, hi = int(pad.min()), int(pad.max())
        if lo < 0 or hi > self.max_len:
            raise ValueError(f"pad values must lie in [0, max_len={self.max_len}], got min {lo}, max {hi}")
        self.start = pad.clone()
        self._key_ok = None if hi == 0 else (self._slots[None, :] >= pad[:, None])[:, None, None, :]

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) position ids of the next T tokens, counted from each row's first real token."""
        self._check_room(T)
        slots = self._slots[self.pos:self.pos + T]
        return (slots[None, :] - self.start[:, None]).clamp_(min=0)

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Bool mask (B, 1, T, pos+T), True = may attend; None when SDPA needs none.

        None means: plain causal attention (pos == 0, queries and keys coincide) or, for a single
        query (T == 1), attention to every cached slot.
        """
        self._check_room(T)
        L = self.pos + T
        if self._key_ok is None and (self.pos == 0 or T == 1):
            return None
        if self._key_ok is not None and T == 1:
            return self._key_ok[..., :L]  # a view: decoding with padding allocates nothing
        q_slots = self._slots[self.pos:L, None]
        k_slots = self._slots[None, :L]
        mask = (k_slots <= q_slots)[None, None]  # causal over absolute slots, (1, 1, T, L)
        if self._key_ok is not None:
            # A pad query has no real key to look at; letting it see itself keeps softmax finite
            # (all-masked rows give NaN, which would leak into later layers' K/V). Its output is unused.
            mask = (mask & self._key_ok[..., :L]) | (k_slots == q_slots)[None, None]
        return mask.expand(self.batch_size, 1, T, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's (B, n_kv_head, T, head_dim) keys/values; return all cached so far."""
        if k.size(0) != self.batch_size:
            raise ValueError(f"chunk has batch {k.size(0)} but the cache was made for batch_size={self.batch_size}")
        T = k.size(2)
        self._check_room(T)
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self._check_room(T)
        self.pos += T

    def expand(self, n: int) -> "KVCache":
        """A new cache where each row is repeated n times (prefill a prompt once, sample n)."""
        _check_positive_int("n", n)
        L, B, H, _, D = self.k.shape
        new = KVCache(B * n, self.max_len, L, H, D, dtype=self.dtype, device=self.device)
        # Broadcast-copy through a (L, B, n, ...) view: row b lands in rows b*n .. b*n+n-1.
        for src, dst in ((self.k, new.k), (self.v, new.v)):
            dst.view(L, B, n, H, self.max_len, D)[..., :self.pos, :] = src[:, :, None, :, :self.pos]
        new.pos = self.pos
        new.start = self.start.repeat_interleave(n)
        if self._key_ok is not None:
            new._key_ok = self._key_ok.repeat_interleave(n, dim=0)
        return new

    def reset(self) -> None:
        """Forget everything (the memory is kept and simply overwritten by the next prefill)."""
        self.pos = 0
        self.start.zero_()
        self._key_ok = None
