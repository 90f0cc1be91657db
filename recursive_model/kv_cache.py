"""Paged KV memory for a recursive GPT: one preallocated pool of fixed-size blocks shared by every sequence.

Prelude and coda layers have one slot each; recurrent layers have `n_slots`, chosen by the strategy:
- exact   : a slot per recurrence (n_slots = the largest budget the pool serves); decode equals the full forward.
- ring:k  : recurrence i uses slot i mod k; equals exact when r <= k; memory for recurrent layers k/r of exact.
- final   : ring:1, only the last recurrence of each token is kept (memory 1/r of exact).
A token that ran fewer recurrences than there are slots (adaptive exit, or a row with a smaller budget) has its deepest
entry copied into the slots above it, so later tokens' lookups at any recurrence see the deepest state it reached.
With exact the copies are lazy: at once only up to the deepest recurrence the sequence's decoded tokens have reached,
and the rest just before a later recurrence reads them (`BatchKV.fill_forward`, `BatchKV.ensure_filled`).

ring:k with r > k, prefill vs decode: in a prefill all prompt tokens run recurrence i together, so a prompt token's
attention at recurrence i reads the other prompt tokens' recurrence-i keys (as exact does). A decoded token at
recurrence i reads slot i mod k of earlier tokens, which holds their *last* recurrence j ≡ i (mod k). Decoding a text
token by token therefore differs from prefilling it once r > k; with r <= k both equal exact. The engines prefill a
prompt but its last token, which is decoded (its output is the first generated token).

Memory is sized in tokens: how many sequences run at once is set by the pool and their lengths, not by a
batch size x context length rectangle. `KVPool` owns the blocks; a `SequenceKV` is one sequence's block list and
length; `BatchKV` is what one forward call over some rows needs (block table, positions, masks).

Shapes: B=rows, H=kv heads, T=new tokens, L=visible key length, Dh=head dim, NB=blocks in the pool, S=block size.
Pool layout: (layers, NB, S, H, Dh), stored flat as (layers * NB, S, H, Dh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import GPTConfig
from .recurrence import parse_kv_cache


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Which keys each query sees: causal, and within `window` tokens (0 = no limit). Broadcasts query_pos (..., T, 1)
    against key_pos (..., L)."""
    visible = key_pos <= query_pos
    return visible & (key_pos > query_pos - window) if window else visible


class PoolFull(RuntimeError):
    """The pool has too few free blocks for the request; retry once running sequences finish."""


class KVPool:
    """Keys/values of every cached layer in `num_blocks` blocks of `block_size` tokens."""

    def __init__(
        self,
        config: GPTConfig,
        num_blocks: int,
        block_size: int = 16,
        strategy: str | None = None,
        num_recur: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KVPool: num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.strategy = strategy or config.decode.kv_cache
        kind, k = parse_kv_cache(self.strategy)
        r = config.decode.num_recur if num_recur is None else num_recur
        # exact needs one slot per recurrence the pool may run; ring keeps k regardless of r.
        self.n_slots = max(1, r) if kind == "exact" else int(k)
        self.kind = kind
        self.n_prelude, self.n_recur, self.n_coda = config.n_prelude, config.n_recur, config.n_coda
        self.windows = sorted(set(config.windows))  # the layers' attention windows (0 = whole context): a mask each
        self.n_layers = self.n_prelude + self.n_recur * self.n_slots + self.n_coda
        self.block_size, self.num_blocks = block_size, num_blocks
        # token-major blocks: a run of consecutive blocks is one contiguous (tokens, H, Dh) slab, read without a copy
        shape = (self.n_layers * num_blocks, block_size, config.n_kv_head, config.head_dim)
        # The storage is flat over (layer, block): row layer * num_blocks + block. Writes index it directly, so a
        # compiled decode graph updates it in place (an in-place write through a per-layer view makes the compiled
        # graph copy that layer). `k`/`v` are the (layers, NB, S, H, Dh) views the rest of the code reads.
        self.k_flat = torch.zeros(shape, device=device, dtype=dtype)
        self.v_flat = torch.zeros(shape, device=device, dtype=dtype)
        self.k = self.k_flat.view(self.n_layers, num_blocks, *shape[1:])
        self.v = self.v_flat.view(self.n_layers, num_blocks, *shape[1:])
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        # exact fills the slots above an exited token lazily (BatchKV.fill_forward): only up to its sequence's level,
        # and later on demand (BatchKV.ensure_filled). That needs each cached token's depth, by flat token row.
        self.lazy = self.kind == "exact" and self.n_slots > 1 and self.n_recur > 0
        self.depth = torch.full((num_blocks * block_size,), self.n_slots, dtype=torch.long, device=device)

    @classmethod
    def for_tokens(cls, config: GPTConfig, max_tokens: int, block_size: int = 16, **kwargs) -> KVPool:
        """A pool holding `max_tokens` tokens in total, over all sequences."""
        return cls(config, num_blocks=max(1, math.ceil(max_tokens / block_size)), block_size=block_size, **kwargs)

    # --- blocks ----------------------------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def allocate(self, seq: SequenceKV, n_tokens: int) -> None:
        """Grow `seq` so it has room for `n_tokens` tokens in total; raises PoolFull (allocating nothing) if short."""
        need = self.blocks_for(n_tokens) - len(seq.blocks)
        if need <= 0:
            return
        if need > len(self._free):
            raise PoolFull(f"KV pool: {need} more blocks needed, {len(self._free)} of {self.num_blocks} free")
        seq.blocks.extend(self._free.pop() for _ in range(need))

    def release(self, seq: SequenceKV) -> None:
        self._free.extend(reversed(seq.blocks))
        seq.blocks.clear()

    def nbytes(self) -> int:
        """Memory held by keys and values."""
        return self.k.numel() * self.k.element_size() * 2

    def bytes_per_token(self) -> int:
        return self.nbytes() // (self.num_blocks * self.block_size)

    # --- layer indexing -------------------------------------------------------------------------------------------
    def prelude_layer(self, j: int) -> int:
        return j

    def slot_for_iter(self, i: int) -> int:
        """Cache slot used by recurrence i (0-based)."""
        if self.kind == "exact" and i >= self.n_slots:
            raise ValueError(f"exact KV cache was sized for {self.n_slots} recurrences; recurrence {i + 1} requested")
        return i % self.n_slots

    def slots_for_iters(self, it: torch.Tensor) -> int | torch.Tensor:
        """Cache slot of each row's recurrence `it` (B,): an int when all rows share one, else a (B,) tensor."""
        lo, hi = int(it.min()), int(it.max())
        if lo == hi:
            return self.slot_for_iter(lo)
        self.slot_for_iter(hi)  # raises when exact was sized for fewer recurrences
        return it % self.n_slots

    def recur_layer(self, j: int, slot: int | torch.Tensor) -> int | torch.Tensor:
        return self.n_prelude + slot * self.n_recur + j

    def coda_layer(self, j: int) -> int:
        return self.n_prelude + self.n_slots * self.n_recur + j


@dataclass
class SequenceKV:
    """One sequence's share of the pool: its blocks, in order, and how many tokens are cached.

    `filled`: every cached token has a valid entry (its own, or its deepest copied up) in every recurrent slot below
    it; `deepest`: the most recurrences any of its decoded tokens ran (the level the next shallow token is filled to).
    """

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    filled: int = 1 << 30
    deepest: int = 0

    def appended(self, depth: int, holds: int, decoded: bool) -> None:
        """New tokens that ran `depth` recurrences and hold every slot below `holds` joined the cache (`decoded`:
        generated one at a time, not a prompt chunk run at the full budget)."""
        self.filled = min(self.filled, holds)
        if decoded:
            self.deepest = max(self.deepest, depth)


class BatchKV:
    """The cache view of one forward call over B rows, each appending T tokens at its own position."""

    def __init__(self, pool: KVPool, table: torch.Tensor, positions: torch.Tensor,
                 seqs: list[SequenceKV] | None = None):
        self.pool = pool
        self._seqs: list[SequenceKV] | tuple[BatchKV, torch.Tensor] | None = seqs  # None: no lazy fill for this view
        self.table = table  # (B, nb) block ids; rows with fewer blocks are padded (never visible, see mask)
        self.positions = positions  # (B, T) absolute positions of the new tokens
        bs = pool.block_size
        self._blk = table.gather(1, positions // bs)  # (B, T) block of each new token
        self._off = positions % bs  # (B, T) offset inside it
        L = table.size(1) * bs
        keys = torch.arange(L, device=positions.device)
        # window -> (B, 1, T, L): causal and within the window, per row
        self.masks = {w: window_mask(positions[:, :, None], keys[None, None, :], w)[:, None] for w in pool.windows}
        self.span: tuple[int, int] | None = None  # (first block, count) when one row's blocks are consecutive
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # the model's (cos, sin) at `positions`, once read

    @classmethod
    def build(cls, pool: KVPool, seqs: list[SequenceKV], T: int, device: torch.device | str) -> BatchKV:
        """Rows `seqs` (their blocks must already cover length + T) each appending T tokens."""
        nb = max(pool.blocks_for(s.length + T) for s in seqs)
        # one tensor from padded lists (built every decode step: a tensor per row cost ~0.1 ms at 16 rows)
        table = torch.tensor([s.blocks[:nb] + [0] * (nb - len(s.blocks[:nb])) for s in seqs], dtype=torch.long)
        starts = torch.tensor([s.length for s in seqs], dtype=torch.long)
        positions = starts[:, None] + torch.arange(T)[None, :]
        view = cls(pool, table.to(device), positions.to(device), seqs)
        first = seqs[0].blocks[:nb]
        if len(seqs) == 1 and len(first) == nb and first == list(range(first[0], first[0] + nb)):
            view.span = (first[0], nb)  # the common single-sequence case: attention reads a slice of the pool
        return view

    def rows(self, idx: torch.Tensor) -> BatchKV:
        """The view of a subset of rows (rows still recurring)."""
        sub = object.__new__(BatchKV)
        sub.pool, sub.table, sub.positions = self.pool, self.table[idx], self.positions[idx]
        sub._blk, sub._off = self._blk[idx], self._off[idx]
        sub.masks = {w: m[idx] for w, m in self.masks.items()}
        sub.span = self.span if self.table.size(0) == 1 and idx.numel() == 1 else None
        sub.rotary = None
        sub._seqs = None if self._seqs is None else (self, idx)  # resolved only if a lazy fill needs them
        return sub

    def sequences(self) -> list[SequenceKV] | None:
        if isinstance(self._seqs, tuple):
            parent, idx = self._seqs
            every = parent.sequences()
            self._seqs = [every[i] for i in idx.tolist()]
        return self._seqs

    def filled_below(self) -> int | None:
        """The lowest recurrent slot some row's cached tokens may not hold yet (None: every slot, or no lazy fill)."""
        seqs = self.sequences() if self.pool.lazy else None
        if not seqs:
            return None
        low = min(q.filled for q in seqs)
        return low if low < self.pool.n_slots else None

    def settle(self, used: int) -> None:
        """After a fixed-budget step on a lazy pool (every new token ran `used` recurrences, nothing filled above):
        record the tokens' depth and lower their sequences' levels."""
        if not self.pool.lazy:
            return
        self.pool.depth[self._blk * self.pool.block_size + self._off] = used
        for q in self.sequences() or ():
            q.appended(used, used, self.positions.size(1) == 1)

    def ensure_filled(self, slot: int | torch.Tensor) -> None:
        """Before a recurrence reads `slot` (per row: a (B,) tensor): copy into it the deepest entry of every cached
        token of the rows that stopped below it (a lazy fill's catch-up)."""
        pool, seqs = self.pool, self.sequences()
        slots = [slot] * len(seqs) if isinstance(slot, int) else slot.tolist()
        by_slot: dict[int, list[int]] = {}
        for b, (q, sl) in enumerate(zip(seqs, slots, strict=True)):
            if q.filled <= sl:
                by_slot.setdefault(sl, []).append(b)
        bs, dev = pool.block_size, self.table.device
        for sl, rows in by_slot.items():
            lengths = [seqs[b].length for b in rows]
            L = max(lengths)
            if L:
                nb = -(-L // bs)
                table = self.table[torch.tensor(rows, device=dev), :nb]
                tok = (table[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(len(rows), -1)[:, :L]
                valid = torch.arange(L, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
                depth = pool.depth[tok]
                need = valid & (depth <= sl)
                idx, src = tok[need], depth[need] - 1
                if idx.numel():
                    for store in (pool.k_flat, pool.v_flat):
                        recur = _recurrent(pool, store)
                        recur[sl][:, idx] = recur[src, :, idx].transpose(0, 1)
            for b in rows:
                seqs[b].filled = sl + 1

    def update(self, layer: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, Dh) at the rows' positions; return every row's keys/values (B, H, L, Dh).

        `layer` is the cached layer of every row, or (B,) one per row (rows at different recurrences).
        """
        B, nb = self.table.shape
        pool = self.pool
        per_row = isinstance(layer, torch.Tensor)
        base = (layer[:, None] if per_row else layer) * pool.num_blocks  # the layer's first row in the flat storage
        kf, vf = pool.k_flat, pool.v_flat
        at = (self._blk + base, self._off)  # (B, T) flat row and offset of each new token
        kf.index_put_(at, k.transpose(1, 2).to(kf.dtype))
        vf.index_put_(at, v.transpose(1, 2).to(vf.dtype))
        if self.span is not None and not per_row:
            lo = base + self.span[0]
            keys, values = kf[lo: lo + self.span[1]][None], vf[lo: lo + self.span[1]][None]  # views, no copy
        else:
            # (B, nb, S, H, Dh) gathered; index_select over the flat rows is ~5x faster than advanced indexing
            rows = (self.table + base).reshape(-1)
            keys = kf.index_select(0, rows).view(B, nb, *kf.shape[1:])
            values = vf.index_select(0, rows).view(B, nb, *vf.shape[1:])
        S, H, Dh = keys.shape[2:]
        # (B, nb*S, H, Dh) -> (B, H, L, Dh): a strided view, which attention reads as is
        return keys.reshape(B, nb * S, H, Dh).transpose(1, 2), values.reshape(B, nb * S, H, Dh).transpose(1, 2)

    def fill_forward(self, used: torch.Tensor | int) -> None:
        """Copy each row's deepest recurrent entry (recurrence used-1) into the slots above it, at its positions.

        `used` (B,) per row, or an int shared by every row (a fixed-budget step: the copies are known without reading
        data, so a compiled graph can hold them).
        A lazy pool (exact) copies only up to the deepest recurrence its sequence's decoded tokens have reached (most
        later tokens stop below it) and lowers the sequence's `filled` level; a later recurrence that reads a slot at
        or above that level first calls `ensure_filled`. Every read sees the same entries as with a full fill.
        """
        pool = self.pool
        if pool.n_recur == 0:
            return
        if isinstance(used, int):
            if pool.lazy:  # left to ensure_filled; GPT.decode_fixed records the depth (`settle`) outside its graph
                return
            pairs = [(pool.recur_layer(j, slot), pool.recur_layer(j, used - 1))
                     for slot in range(used, pool.n_slots) for j in range(pool.n_recur)]
            if pairs:
                dst, src = (torch.tensor(x, device=self._blk.device)[:, None, None] * pool.num_blocks + self._blk
                            for x in zip(*pairs, strict=True))  # (pairs, B, T) rows of the flat storage
                pool.k_flat[dst, self._off] = pool.k_flat[src, self._off]
                pool.v_flat[dst, self._off] = pool.v_flat[src, self._off]
            return
        tok_rows = self._blk * pool.block_size + self._off  # (B, T) flat token rows of the new tokens
        seqs = self.sequences() if pool.lazy else None
        if pool.lazy:
            pool.depth[tok_rows] = used.to(pool.depth.device)[:, None]
        tops: list[int] = []  # per row: the new tokens must hold every slot below it
        depth_rows: dict[int, list[int]] = {}  # depth -> rows that stopped there, below their top
        for b, u in enumerate(used.tolist()):
            top = pool.n_slots
            if seqs is not None:  # lazy: fill up to the deepest its sequence's decoded tokens reached, not every slot
                q = seqs[b]
                top = min(q.filled, pool.n_slots, max(u, q.deepest))
                q.appended(u, max(u, top), tok_rows.size(1) == 1)
            tops.append(top)
            if u < top:
                depth_rows.setdefault(u, []).append(b)
        if not depth_rows:  # every row holds its own entry in every slot it must
            return
        if len(depth_rows) <= 2:
            # The common decode step: rows stop at one or two depths. Per depth, one broadcast write of the deepest
            # entry into the slots above it (up to the rows' highest top; writing more than a row needs is harmless).
            for depth, rows in depth_rows.items():
                t = (tok_rows if len(rows) == tok_rows.size(0) else
                     tok_rows[torch.tensor(rows, device=tok_rows.device)]).reshape(-1)
                top = max(tops[b] for b in rows)
                for store in (pool.k_flat, pool.v_flat):
                    recur = _recurrent(pool, store)
                    recur[depth:top, :, t] = recur[depth - 1, :, t][None]
            return
        used = used.to(self._blk.device)
        # Every (row, token, slot, recurrent layer) entry reads slot min(slot, depth - 1): the deepest entry where the
        # slot is above the row's depth, itself below it. The no-op copies cost less than finding the entries that
        # need one (a nonzero and its gathers); one gather and one scatter over the storage flattened to one row per
        # cached token move them all.
        slots = torch.arange(pool.n_slots, device=used.device)
        src_slot = torch.minimum(slots, used[:, None] - 1)[:, None, :, None]  # (B, 1, S, 1)
        layer = torch.arange(pool.n_recur, device=used.device) + pool.n_prelude  # (R,) slot 0's recurrent layers
        per_layer = pool.num_blocks * pool.block_size  # flat rows per cached layer
        tok = (self._blk * pool.block_size + self._off)[:, :, None, None]  # (B, T, 1, 1) flat row in layer 0
        dst = ((slots[:, None] * pool.n_recur + layer) * per_layer + tok).reshape(-1)
        src = ((src_slot * pool.n_recur + layer) * per_layer + tok).reshape(-1)
        for store in (pool.k_flat, pool.v_flat):
            rows = store.view(-1, *store.shape[2:])
            rows.index_copy_(0, dst, rows.index_select(0, src))


def _recurrent(pool: KVPool, store: torch.Tensor) -> torch.Tensor:
    """The recurrent layers of `store` (k_flat or v_flat) as (slot, layer, flat token row, H, Dh): contiguous in the
    storage, so one slot's entries of a set of tokens are one indexed write."""
    first = pool.n_prelude
    recur = store.view(pool.n_layers, -1, *store.shape[2:])[first: first + pool.n_slots * pool.n_recur]
    return recur.view(pool.n_slots, pool.n_recur, *recur.shape[1:])


class KVCache:
    """A static batch of `batch_size` sequences of up to `max_len` tokens each, over its own pool.

    The convenience form of the pool for one-shot callers (tests, benchmarks, scoring): rows advance together by the
    `lengths` given to each forward call.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        num_recur: int | None = None,
        strategy: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        block_size: int = 16,
    ):
        bs = min(block_size, max_len)
        per_row = math.ceil(max_len / bs)
        self.pool = KVPool(config, num_blocks=batch_size * per_row, block_size=bs, strategy=strategy,
                           num_recur=num_recur, device=device, dtype=dtype)
        self.strategy, self.n_slots, self.max_len, self.device = self.pool.strategy, self.pool.n_slots, max_len, device
        self.seqs = [SequenceKV() for _ in range(batch_size)]
        for s in self.seqs:
            self.pool.allocate(s, max_len)

    @property
    def pos(self) -> torch.Tensor:
        """(B,) next write position per row."""
        return torch.tensor([s.length for s in self.seqs], dtype=torch.long)

    def view(self, T: int) -> BatchKV:
        longest = max(s.length for s in self.seqs)
        if longest + T > self.max_len:
            raise ValueError(f"KV cache full: {longest} + {T} tokens > max_len={self.max_len}")
        return BatchKV.build(self.pool, self.seqs, T, self.device)

    def advance(self, lengths: torch.Tensor) -> None:
        for s, n in zip(self.seqs, lengths.tolist(), strict=True):
            s.length += int(n)

    def nbytes(self) -> int:
        return self.pool.nbytes()

    def key(self, layer: int, row: int, pos: int) -> torch.Tensor:
        """The cached key (H, Dh) of `row` at position `pos` in cache layer `layer` (for inspection and tests)."""
        seq = self.seqs[row]
        bs = self.pool.block_size
        return self.pool.k[layer, seq.blocks[pos // bs], pos % bs]
