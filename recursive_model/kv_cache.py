"""KV cache for a recursive GPT: prelude and coda layers have one slot each, recurrent layers have `n_slots`.

Strategies (GPTConfig.kv_cache):
- exact   : a slot per recurrence per recurrent layer; decode equals the full forward at fixed r.
- ring:k  : recurrence i uses slot i mod k; equals exact when r <= k; memory for recurrent layers k/r of exact.
- final   : ring:1, only the last recurrence of each token is kept (memory 1/r of exact).
A token that used fewer recurrences than there are slots (adaptive exit, or a smaller r) has its deepest entry copied
into the slots above it, so later tokens' lookups at any recurrence see the deepest state that token reached.

Shapes: B=batch, H=kv heads, L=cache length, Dh=head dim, T=new tokens in this call.
"""

from __future__ import annotations

import torch

from .config import GPTConfig, parse_kv_cache


class KVCache:
    """Key/value tensors of every cached layer plus the per-row write position."""

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        num_recur: int,
        strategy: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.strategy = strategy or config.kv_cache
        kind, k = parse_kv_cache(self.strategy)
        # exact needs one slot per recurrence the caller may run; ring keeps k regardless of r.
        self.n_slots = max(1, num_recur) if kind == "exact" else int(k)
        self.kind = kind
        self.n_prelude, self.n_recur, self.n_coda = config.n_prelude, config.n_recur, config.n_coda
        n_layers = self.n_prelude + (self.n_recur * self.n_slots) + self.n_coda
        shape = (n_layers, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # next write position per row
        self.max_len = max_len

    # --- layer indexing -------------------------------------------------------------------------------------------
    def prelude_layer(self, j: int) -> int:
        return j

    def slot_for_iter(self, i: int) -> int:
        """Cache slot used by recurrence i (0-based)."""
        if self.kind == "exact" and i >= self.n_slots:
            raise ValueError(f"exact KV cache was sized for {self.n_slots} recurrences; recurrence {i + 1} requested")
        return i % self.n_slots

    def recur_layer(self, j: int, slot: int) -> int:
        return self.n_prelude + slot * self.n_recur + j

    def coda_layer(self, j: int) -> int:
        return self.n_prelude + self.n_slots * self.n_recur + j

    # --- reads and writes -----------------------------------------------------------------------------------------
    def positions(self, T: int) -> torch.Tensor:
        """(B, T) absolute positions of the next T tokens of every row."""
        return self.pos[:, None] + torch.arange(T, device=self.pos.device)[None, :]

    def check_room(self, T: int) -> None:
        if int(self.pos.max()) + T > self.max_len:
            raise ValueError(f"KV cache full: {int(self.pos.max())} + {T} tokens > max_len={self.max_len}")

    def attn_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, L) boolean mask: a query at position p sees keys at positions <= p."""
        L = int(positions.max()) + 1
        keys = torch.arange(L, device=positions.device)
        return (keys[None, None, :] <= positions[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write k, v (B, H, T, Dh) at `positions` (B, T) and return the keys/values up to the furthest position."""
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        self.k[layer][rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        L = int(positions.max()) + 1
        return self.k[layer, :, :, :L], self.v[layer, :, :, :L]

    def fill_forward(self, used: torch.Tensor, positions: torch.Tensor) -> None:
        """Copy each row's deepest recurrent entry (recurrence used-1) into the slots above it at `positions`."""
        if self.n_recur == 0:
            return
        rows_all = torch.arange(used.size(0), device=used.device)
        for u in torch.unique(used).tolist():
            if u >= self.n_slots:
                continue  # every slot was written by this row's recurrences
            rows = rows_all[used == u]
            pos = positions[rows]
            src = self.slot_for_iter(u - 1)
            for j in range(self.n_recur):
                s_layer = self.recur_layer(j, src)
                for dst in range(u, self.n_slots):
                    d_layer = self.recur_layer(j, dst)
                    self.k[d_layer][rows[:, None], :, pos] = self.k[s_layer][rows[:, None], :, pos]
                    self.v[d_layer][rows[:, None], :, pos] = self.v[s_layer][rows[:, None], :, pos]

    def advance(self, lengths: torch.Tensor) -> None:
        self.pos += lengths

    def nbytes(self) -> int:
        """Memory held by keys and values."""
        return self.k.numel() * self.k.element_size() * 2
