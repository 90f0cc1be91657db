"""A recursive GPT in the nanochat style: prelude -> recurrent block applied r times -> coda.

Blocks: rotary embeddings, QK-norm, parameter-free RMSNorm, relu^2 MLP, no biases, logit soft-cap.
The recurrent state s and the prelude output e meet in an adapter (concat_linear: Linear(2D -> D) over [e, s],
initialised to the identity on e) at the start of every recurrence. Single-device math: devices, DDP and compile are
applied from outside.

Shapes: B=batch, T=time, D=model dim, H=heads, Hk=kv heads, Dh=head dim, V=vocab, R=recurrences, L=cache length.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .kv_cache import KVCache


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh); cos/sin broadcastable to (B, T, 1, Dh/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class LayerKV:
    """What one attention layer needs to use the cache: where to write and which keys it may see."""

    __slots__ = ("cache", "layer", "positions", "mask")

    def __init__(self, cache: KVCache, layer: int, positions: torch.Tensor, mask: torch.Tensor):
        self.cache, self.layer, self.positions, self.mask = cache, layer, positions, mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d = config.n_embd
        self.c_q = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, kv: LayerKV | None = None):
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, Dh)
        gqa = self.n_kv_head != self.n_head
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = kv.cache.update(kv.layer, k, v, kv.positions)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=kv.mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv: LayerKV | None = None):
        x = x + self.attn(norm(x), cos, sin, kv)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Recursive GPT. `model(idx, targets=None, num_recur=None)`; `forward_cached` for decoding with a KVCache."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.prelude = nn.ModuleList([Block(config) for _ in range(config.n_prelude)])
        self.recur = nn.ModuleList([Block(config) for _ in range(config.n_recur)])
        self.coda = nn.ModuleList([Block(config) for _ in range(config.n_coda)])
        use_adapter = config.is_recursive and config.inject_mode == "concat_linear"
        self.adapter = nn.Linear(2 * config.n_embd, config.n_embd, bias=False) if use_adapter else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = self._rotary_table(config.sequence_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._recur_step = self.recur_step  # replaced by compile_recurrence()
        self.init_weights()

    # --- construction ---------------------------------------------------------------------------------------------
    @staticmethod
    def _rotary_table(seq_len: int, head_dim: int, base: float = 10000.0):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, Dh/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat init: zero output projections (blocks start as identity), tiny lm_head, adapter = identity on e."""
        d = self.config.n_embd
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0) / math.sqrt(d)
        for block in [*self.prelude, *self.recur, *self.coda]:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if self.adapter is not None:
            # adapter([e, s]) = e at init: the recurrence starts as "re-read the prompt embedding".
            self.adapter.weight.zero_()
            self.adapter.weight[:, :d].copy_(torch.eye(d))

    # --- the recurrence -------------------------------------------------------------------------------------------
    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        """s0 according to config.state_init: a fresh tensor without gradient (as Huginn's noise state).

        Gradient reaches e through the injection at every differentiated recurrence, never through s0; keeping s0 a
        distinct, grad-free tensor also keeps the compiled recurrence from specialising on aliasing.
        """
        mode = self.config.state_init
        if mode == "embed":
            return e.detach().clone()
        if mode == "zeros":
            return torch.zeros_like(e)
        std = math.sqrt(2.0 / 5.0)  # Huginn's truncated normal, variance 2/5
        return nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std)

    def inject(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            return self.adapter(torch.cat([e, s], dim=-1))
        return e + s

    def recur_step(self, s, e, cos, sin, kvs: list[LayerKV] | None = None) -> torch.Tensor:
        """One application of the recurrent block: s_{i+1} = block(inject(s_i, e))."""
        x = self.inject(s, e)
        for j, block in enumerate(self.recur):
            x = block(x, cos, sin, None if kvs is None else kvs[j])
        return x

    def compile_recurrence(self, **compile_kwargs) -> None:
        """Compile one recurrence once; the Python loop over r stays outside, so r never triggers a recompile."""
        self._recur_step = torch.compile(self.recur_step, **compile_kwargs)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(norm(x)).float()
        cap = self.config.softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    # --- full forward (training, scoring) -------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, num_recur: int | None = None,
                loss_reduction: str = "mean"):
        """Logits (B, T, V) without targets; with targets (-1 = ignore) the cross-entropy ('mean' or 'none': (B*T,)).

        When gradients are enabled only the last `bptt_k` recurrences are differentiated (truncated BPTT).
        """
        B, T = idx.shape
        if T > self.config.sequence_len:
            raise ValueError(f"sequence of {T} tokens exceeds sequence_len={self.config.sequence_len}")
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        for block in self.prelude:
            x = block(x, cos, sin)
        if self.config.is_recursive:
            r = self.config.eval_recur if num_recur is None else int(num_recur)
            if r < 1:
                raise ValueError(f"num_recur={r} must be >= 1")
            e = x
            s = self.initial_state(e)
            n_frozen = max(0, r - self.config.bptt_k) if torch.is_grad_enabled() else 0
            with torch.no_grad():
                e_frozen = e.detach()  # same graph as inference (e without grad) for the frozen steps
                for _ in range(n_frozen):
                    s = self._recur_step(s, e_frozen, cos, sin)
            if torch.is_grad_enabled():
                # Every differentiated step then sees a state that requires grad: one compiled graph, not two.
                s = s.detach().requires_grad_()
            for _ in range(r - n_frozen):
                s = self._recur_step(s, e, cos, sin)
            x = s
        for block in self.coda:
            x = block(x, cos, sin)
        logits = self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    # --- cached forward (decode) ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_cached(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        num_recur: int | None = None,
        lengths: torch.Tensor | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        min_recur: int | None = None,
        init_state: torch.Tensor | None = None,
    ):
        """Append idx (B, T) to the cache and return (logits (B, V), recurrences used (B,), final state (B, D)).

        Outputs are taken at each row's last valid token (`lengths`, default T: right-padded prefill). Adaptive exit
        (criterion 'kl' or 'latent') applies per row when T == 1; exited rows keep their state frozen while the rest
        recur, and the cache gets their deepest entry. `init_state` (B, D) replaces s0 (warm start from the previous
        token's final state).
        """
        cfg = self.config
        B, T = idx.shape
        lengths = torch.full((B,), T, dtype=torch.long, device=idx.device) if lengths is None else lengths
        cache.check_room(T)
        positions = cache.positions(T)  # (B, T)
        if int(positions.max()) >= cfg.sequence_len:
            raise ValueError(f"position {int(positions.max())} exceeds sequence_len={cfg.sequence_len}")
        cos, sin = self.cos[0][positions], self.sin[0][positions]  # (B, T, 1, Dh/2)
        mask = cache.attn_mask(positions)

        def kv(layer: int) -> LayerKV:
            return LayerKV(cache, layer, positions, mask)

        x = norm(self.wte(idx))
        for j, block in enumerate(self.prelude):
            x = block(x, cos, sin, kv(cache.prelude_layer(j)))
        r = cfg.eval_recur if num_recur is None else int(num_recur)
        used = torch.full((B,), r if cfg.is_recursive else 0, dtype=torch.long, device=idx.device)
        if cfg.is_recursive:
            criterion = cfg.exit_criterion if exit_criterion is None else exit_criterion
            threshold = cfg.exit_threshold if exit_threshold is None else exit_threshold
            r_min = cfg.exit_min_recur if min_recur is None else min_recur
            adaptive = criterion != "none" and T == 1
            e = x
            s = self.initial_state(e) if init_state is None else init_state.view(B, 1, -1).to(e.dtype)
            active = torch.ones(B, dtype=torch.bool, device=idx.device)
            prev_logp = None
            for i in range(r):
                slot = cache.slot_for_iter(i)
                s_new = self.recur_step(s, e, cos, sin, [kv(cache.recur_layer(j, slot)) for j in range(cfg.n_recur)])
                if not adaptive:
                    s = s_new
                    continue
                s_new = torch.where(active[:, None, None], s_new, s)  # exited rows keep their state
                if criterion == "latent":
                    change = (s_new - s).norm(dim=-1) / s_new.norm(dim=-1).clamp_min(1e-12)
                    converged = change[:, 0] < threshold
                else:  # kl between successive recurrences' next-token distributions
                    logp = F.log_softmax(self._coda_logits(s_new, cos, sin, cache, kv), dim=-1)[:, -1]
                    converged = torch.zeros_like(active)
                    if prev_logp is not None:
                        kl = (logp.exp() * (logp - prev_logp)).sum(-1)
                        converged = kl < threshold
                    prev_logp = logp
                s = s_new
                exiting = active & converged & (i + 1 >= r_min)
                used[exiting] = i + 1
                active &= ~exiting
                if not active.any():
                    break
            cache.fill_forward(used, positions)
            x = s
        logits = self._coda_logits(x, cos, sin, cache, kv)
        cache.advance(lengths)
        last = (lengths - 1).clamp_min(0)
        rows = torch.arange(B, device=idx.device)
        return logits[rows, last], used, x[rows, last]

    def _coda_logits(self, x, cos, sin, cache: KVCache, kv) -> torch.Tensor:
        for j, block in enumerate(self.coda):
            x = block(x, cos, sin, kv(cache.coda_layer(j)))
        return self.head(x)

    # --- accounting -----------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def effective_depth(self, num_recur: int | None = None) -> int:
        return self.config.effective_depth(num_recur)

    def flops_per_token(self, num_recur: int | None = None, training: bool = True) -> float:
        """Matmul + attention FLOPs per token (forward 2N, backward 4N only for differentiated recurrences)."""
        cfg = self.config
        r = (cfg.eval_recur if num_recur is None else num_recur) if cfg.is_recursive else 0
        block = sum(p.numel() for p in self.recur[0].parameters()) if cfg.is_recursive else 0
        adapter = self.adapter.weight.numel() if self.adapter is not None else 0
        once = sum(p.numel() for b in [*self.prelude, *self.coda] for p in b.parameters()) + self.lm_head.weight.numel()
        per_iter = cfg.n_recur * block + adapter
        attn_per_layer = 2 * cfg.n_head * cfg.head_dim * cfg.sequence_len  # QK^T and AV, causal-averaged x2 fwd
        layers_once, layers_iter = cfg.n_prelude + cfg.n_coda, cfg.n_recur
        fwd = 2 * (once + r * per_iter) + attn_per_layer * (layers_once + r * layers_iter)
        if not training:
            return float(fwd)
        k = min(r, cfg.bptt_k)
        bwd = 2 * (2 * (once + k * per_iter) + attn_per_layer * (layers_once + k * layers_iter))
        return float(fwd + bwd)


def parameter_counts(config: GPTConfig) -> dict[str, int]:
    """Parameter counts by part, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    parts = {
        "embedding": model.wte.weight.numel(),
        "lm_head": model.lm_head.weight.numel(),
        "prelude": sum(p.numel() for p in model.prelude.parameters()),
        "recur": sum(p.numel() for p in model.recur.parameters()),
        "coda": sum(p.numel() for p in model.coda.parameters()),
        "adapter": model.adapter.weight.numel() if model.adapter is not None else 0,
    }
    parts["total"] = sum(parts.values())
    return parts
