"""A recursive GPT in the nanochat style: prelude -> recurrent block applied r times -> coda.

Blocks: rotary embeddings, QK-norm, parameter-free RMSNorm, relu^2 MLP, no biases, logit soft-cap.
The recurrent state s and the prelude output e meet in an adapter (concat_linear: Linear(2D -> D) over [e, s],
initialised to the identity on e) at the start of every recurrence. Single-device math: devices, DDP and compile are
applied from outside.

Shapes: B=batch, T=time, D=model dim, H=heads, Hk=kv heads, Dh=head dim, V=vocab, R=recurrences, L=cache length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .kv_cache import BatchKV, KVCache, window_mask
from .recurrence import EXIT_CRITERIA, DecodeSettings, ExitRule


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh); cos/sin broadcastable to (B, T, 1, Dh/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class LayerKV:
    """What one attention layer needs to use the cache: the batch view and which cached layer it is."""

    __slots__ = ("view", "layer")

    def __init__(self, view: BatchKV, layer: int | torch.Tensor):  # a (B,) tensor: one cached layer per row
        self.view, self.layer = view, layer


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, window: int = 0):
        super().__init__()
        self.window = window  # tokens a query sees (itself included); 0 = the whole context
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
            mask = None  # the fused causal kernel
            if self.window:
                pos = torch.arange(T, device=x.device)
                mask = window_mask(pos[:, None], pos, self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        else:
            k, v = kv.view.update(kv.layer, k, v)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=kv.view.masks[self.window],
                                               enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, window: int = 0):
        super().__init__()
        self.attn = CausalSelfAttention(config, window)
        self.mlp = MLP(config)

        self.decode_step = None  # set by GPT.compile_decode(): this block's compiled one-token cached forward

    def forward(self, x, cos, sin, kv: LayerKV | None = None):
        # (inside a graph being traced, e.g. the compiled fixed-budget token, the block is traced as part of it)
        if kv is not None and self.decode_step is not None and x.size(1) == 1 and not torch.compiler.is_compiling():
            return self.decode_step(x, cos, sin, kv)
        return self.layer(x, cos, sin, kv)

    def layer(self, x, cos, sin, kv: LayerKV | None = None):
        x = x + self.attn(norm(x), cos, sin, kv)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Recursive GPT. `model(idx, targets=None, num_recur=None)`; `forward_cached` for decoding with a KVCache."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        w_prelude, w_recur, w_coda = config.windows
        self.prelude = nn.ModuleList([Block(config, w_prelude) for _ in range(config.n_prelude)])
        self.recur = nn.ModuleList([Block(config, w_recur) for _ in range(config.n_recur)])
        self.coda = nn.ModuleList([Block(config, w_coda) for _ in range(config.n_coda)])
        use_adapter = config.is_recursive and config.inject_mode == "concat_linear"
        self.adapter = nn.Linear(2 * config.n_embd, config.n_embd, bias=False) if use_adapter else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.exit_gate = nn.Linear(config.n_embd, 1) if config.exit_gate else None
        cos, sin = self._rotary_table(config.sequence_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._recur_step = self.recur_step  # replaced by compile_recurrence()
        self._fixed_token = self.fixed_token  # replaced by compile_decode()
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
        if self.exit_gate is not None:
            # Start by stopping rarely (hazard ~0.12): the exit distribution begins spread over the late steps.
            nn.init.zeros_(self.exit_gate.weight)
            nn.init.constant_(self.exit_gate.bias, -2.0)
        if self.adapter is not None:
            # adapter([e, s]) = e at init: the recurrence starts as "re-read the prompt embedding".
            self.adapter.weight.zero_()
            self.adapter.weight[:, :d].copy_(torch.eye(d))

    # --- the recurrence -------------------------------------------------------------------------------------------
    def initial_state(self, e: torch.Tensor,
                      generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
        """s0 according to config.state_init: a fresh tensor without gradient (as Huginn's noise state).

        Gradient reaches e through the injection at every differentiated recurrence, never through s0; keeping s0 a
        distinct, grad-free tensor also keeps the compiled recurrence from specialising on aliasing. For 'noise',
        `generators` (one per row of e) make each row's draw its own, so decoding is reproducible from a seed and
        independent of batch mates; without them the global RNG is used (training seeds it per step).
        """
        mode = self.config.state_init
        if mode == "embed":
            return e.detach().clone()
        if mode == "zeros":
            return torch.zeros_like(e)
        std = math.sqrt(2.0 / 5.0)  # Huginn's truncated normal, variance 2/5
        out = torch.empty_like(e)
        if generators is None:
            return nn.init.trunc_normal_(out, std=std, a=-3 * std, b=3 * std)
        for b, g in enumerate(generators):
            cpu = torch.empty(e.shape[1:], dtype=e.dtype)  # drawn on CPU: the same numbers on every device
            out[b] = nn.init.trunc_normal_(cpu, std=std, a=-3 * std, b=3 * std, generator=g).to(e.device)
        return out

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

    def compile_decode(self, **compile_kwargs) -> None:
        """Compile the one-token cached forward, in two forms (both dynamic in batch size and cache length).

        Decoding is launch-bound at small widths, so what pays is fewer, larger graphs:
        - `decode_fixed` (a step in which every row decodes one token at the same budget with no exit rule: the whole
          token, prelude to head, is straight-line code) becomes one graph per budget r; after torch's recompile
          limit (8 variants) further budgets run the per-block graphs below;
        - every other step (exit rules, mixed budgets, carried tokens) runs each block's compiled one-token forward
          (cache write + paged read + attention + MLP); the loop over recurrences, the exits and the gathers of rows
          still recurring stay in Python, so neither r nor the exit pattern recompiles those.
        """
        compile_kwargs.setdefault("dynamic", True)
        if compile_kwargs.get("backend", "inductor") == "inductor" and "mode" not in compile_kwargs:
            # A batch-1 token's matmuls are matrix-vector products; on CPU this inductor pass turns them into fused
            # multiply-reduce kernels instead of ~65 separate GEMM calls per token (1.6x tokens/s at cpu-small,
            # benchmarks/decode.py). It only touches CPU matmuls with one row, so batched and GPU graphs are unchanged.
            compile_kwargs.setdefault("options", {"post_grad_fusion_options": {"decompose_mm_pass": {}}})
        for block in [*self.prelude, *self.recur, *self.coda]:
            block.decode_step = torch.compile(block.layer, **compile_kwargs)
        self._fixed_token = torch.compile(self.fixed_token, **compile_kwargs)

    def uncompile_decode(self) -> None:
        """Back to eager one-token decoding (undoes compile_decode)."""
        for block in [*self.prelude, *self.recur, *self.coda]:
            block.decode_step = None
        self._fixed_token = self.fixed_token

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(norm(x)).float()
        cap = self.config.softcap
        # cap * tanh(logits / cap), written with the sigmoid (tanh(u) = 2 sigmoid(2u) - 1): the same function, and
        # torch's CPU tanh is ~3x slower than its sigmoid (0.20 vs 0.06 ms at 16 x 4096), paid by every decoded token
        return torch.sigmoid(logits * (2 / cap)) * (2 * cap) - cap if cap > 0 else logits

    # --- full forward (training, scoring) -------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, num_recur: int | None = None,
                loss_reduction: str = "mean", bptt_k: int | None = None, supervise: int | None = None,
                gate_entropy: float | None = None):
        """Logits (B, T, V) without targets; with targets (-1 = ignore) the cross-entropy ('mean' or 'none': (B*T,)).

        When gradients are enabled only the last `bptt_k` recurrences (default config.recurrence.bptt_k) are
        differentiated (truncated BPTT), the loss is the mean over the last `supervise` of them (deep supervision,
        default config.recurrence.supervise) and, with an exit gate, the gate's loss is added (see `_gate_loss`).
        Without gradients (eval, scoring) the loss is the last recurrence's. `num_recur` defaults to
        config.decode.num_recur.
        """
        cfg = self.config
        x, cos, sin = self._prelude(idx)
        states = [x]  # the coda's inputs whose loss counts (several under deep supervision)
        if cfg.is_recursive:
            r = cfg.decode.num_recur if num_recur is None else int(num_recur)
            k = cfg.recurrence.bptt_k if bptt_k is None else int(bptt_k)
            if r < 1:
                raise ValueError(f"num_recur={r} must be >= 1")
            training = torch.is_grad_enabled() and targets is not None
            n_sup = 1
            if training:
                n_sup = cfg.recurrence.supervise if supervise is None else int(supervise)
                if n_sup < 1:
                    raise ValueError(f"supervise={n_sup} must be >= 1")
            e = x
            s = self.initial_state(e)
            if torch.is_autocast_enabled(e.device.type):
                # Every later state leaves the autocast adapter in the autocast dtype: s0 matching it keeps the
                # compiled recurrence at one graph per grad mode instead of two.
                s = s.to(torch.get_autocast_dtype(e.device.type))
            n_frozen = max(0, r - k) if torch.is_grad_enabled() else 0
            with torch.no_grad():
                e_frozen = e.detach()  # same graph as inference (e without grad) for the frozen steps
                for _ in range(n_frozen):
                    s = self._recur_step(s, e_frozen, cos, sin)
            if torch.is_grad_enabled():
                # Every differentiated step then sees a state that requires grad: one compiled graph, not two.
                s = s.detach().requires_grad_()
            n_live = r - n_frozen
            states = []
            for i in range(n_live):
                s = self._recur_step(s, e, cos, sin)
                if i >= n_live - n_sup:
                    states.append(s)
        if targets is None:
            return self.head(self._coda(states[-1], cos, sin))
        flat = targets.reshape(-1)
        losses = [self._token_losses(self._coda(x_t, cos, sin), flat) for x_t in states]
        per_token = torch.stack(losses).mean(0)  # (B*T,)
        if self.exit_gate is not None and torch.is_grad_enabled() and cfg.is_recursive:
            beta = cfg.recurrence.gate_entropy if gate_entropy is None else float(gate_entropy)
            per_token = per_token + self._gate_loss(states, torch.stack(losses), flat != -1, beta)
        if loss_reduction == "none":
            return per_token
        valid = (flat != -1).sum().clamp_min(1)
        return per_token.sum() / valid

    def _token_losses(self, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (B*T,) of the coda output y (B, T, D) against flat targets (B*T,), 0 where a target is -1.

        The head runs only where a target counts: in chat stages most positions are prompt tokens (a walk trains 2 of
        ~16), and at a 4096-token vocabulary the head costs more than the whole recurrent block.
        """
        y = y.reshape(-1, y.size(-1))
        valid = flat != -1
        if bool(valid.all()):
            return F.cross_entropy(self.head(y), flat, reduction="none")
        rows = valid.nonzero().squeeze(1)
        loss = F.cross_entropy(self.head(y.index_select(0, rows)), flat.index_select(0, rows), reduction="none")
        return torch.zeros(flat.shape, dtype=loss.dtype, device=loss.device).index_copy(0, rows, loss)

    @torch.no_grad()
    def iterate(self, idx: torch.Tensor, num_recur: int):
        """Yield (r, state (B, T, D), logits (B, T, V)) after each recurrence r = 1..num_recur of one forward.

        logits at r are what `forward(idx, num_recur=r)` returns, for every r at the cost of the largest one (curves
        of accuracy vs r, where an exit would fire).
        """
        if not self.config.is_recursive:
            raise ValueError("iterate needs a recurrent block (n_recur >= 1)")
        e, cos, sin = self._prelude(idx)
        s = self.initial_state(e)
        for r in range(1, num_recur + 1):
            s = self._recur_step(s, e, cos, sin)
            yield r, s, self.head(self._coda(s, cos, sin))

    def _prelude(self, idx: torch.Tensor, kv: BatchKV | None = None):
        """Embedding + prelude of idx (B, T): (e (B, T, D), cos, sin). A full forward (positions 0..T-1), or with `kv`
        a cached one at the positions kv holds."""
        if kv is None:
            T = idx.size(1)
            if T > self.config.sequence_len:
                raise ValueError(f"sequence of {T} tokens exceeds sequence_len={self.config.sequence_len}")
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:
            cos, sin = self._rotary_at(kv)
        x = norm(self.wte(idx))
        for j, block in enumerate(self.prelude):
            x = block(x, cos, sin, None if kv is None else LayerKV(kv, kv.pool.prelude_layer(j)))
        return x, cos, sin

    def gate_prob(self, s: torch.Tensor) -> torch.Tensor:
        """Exit-gate probability of stopping after the recurrence that produced state s (..., D) -> (...)."""
        logit = self.exit_gate(norm(s)).squeeze(-1)
        return torch.sigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32)))  # bf16 hazards saturate

    def _gate_loss(self, states: list[torch.Tensor], losses: torch.Tensor, valid: torch.Tensor,
                   beta: float) -> torch.Tensor:
        """Per-token loss of the exit gate over the supervised recurrences t = 1..n (Ouro-style, arXiv 2510.25741).

        The gate's hazards lambda_t give an exit distribution p_t = lambda_t * prod_{j<t} (1 - lambda_j) (the last
        step takes the rest). Loss = sum_t p_t * L_t - beta * H(p), with the LM losses L_t and the states detached: the
        gate learns where the answer is already as good as it gets, and neither the LM nor the recurrence is pulled
        towards steps the gate likes (the gate is a probe; the LM gradient is the same as without it).
        Without the entropy term the distribution collapses onto one step. Returns (B*T,); 0 where `valid` is false.
        """
        hazards = [self.gate_prob(s_t.detach()).reshape(-1) for s_t in states[:-1]]
        p, survive = [], torch.ones_like(losses[0])
        for lam in hazards:
            p.append(survive * lam)
            survive = survive * (1 - lam)
        p.append(survive)
        p = torch.stack(p)  # (n, B*T)
        expected = (p * losses.detach()).sum(0)
        entropy = -(p * p.clamp_min(1e-9).log()).sum(0)
        return torch.where(valid, expected - beta * entropy, torch.zeros_like(expected))

    def _coda(self, x, cos, sin, kv: BatchKV | None = None):
        for j, block in enumerate(self.coda):
            x = block(x, cos, sin, None if kv is None else LayerKV(kv, kv.pool.coda_layer(j)))
        return x

    # --- cached forward (decode) ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_cached(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        settings: DecodeSettings | None = None,
        lengths: torch.Tensor | None = None,
        init_state: torch.Tensor | None = None,
        prompt: bool | None = None,
    ):
        """Append idx (B, T) to a static KVCache with one DecodeSettings for every row (default: config.decode).

        Returns (logits (B, V), recurrences used (B,), final state (B, D)) at each row's last valid token
        (`lengths`, default T: right-padded prefill). `init_state` (B, D) replaces s0 (warm start). `prompt`: the
        tokens are prompt tokens and run the full budget (default: T > 1; pass True for a one-token prompt).
        The cache's own strategy applies (settings.kv_cache is what the cache was built with).
        """
        settings = self.config.decode if settings is None else settings
        B, T = idx.shape
        lengths = torch.full((B,), T, dtype=torch.long) if lengths is None else lengths.cpu()
        kv = cache.view(T)
        out = self.forward_rows(idx, kv, [settings] * B, lengths=lengths.to(idx.device), init_state=init_state,
                                prompt=T > 1 if prompt is None else prompt)
        cache.advance(lengths)
        return out

    @torch.no_grad()
    def forward_rows(
        self,
        idx: torch.Tensor,
        kv: BatchKV,
        settings: Sequence[DecodeSettings],
        lengths: torch.Tensor | None = None,
        init_state: torch.Tensor | None = None,
        warm: torch.Tensor | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        prompt: bool = False,
    ):
        """One cached forward over rows that each carry their own DecodeSettings (budget r, exit rule).

        idx (B, T) is appended at the positions `kv` holds. Prompt tokens (`prompt=True`) run every row's full budget;
        decoded tokens (T == 1) stop recurring once their exit rule fires. Compute follows exits: at every recurrence
        only the rows still recurring are gathered and run, so an exited or low-budget row costs nothing more and no
        row's result depends on its batch mates. `init_state` (B, D) with mask `warm` (B,) (default: all rows) replaces
        s0 (warm start); `generators` give each row its own noise for state_init='noise'.
        Returns (logits (B, V), recurrences used (B,), final state (B, D)) at each row's last valid token.

        The same pass in three phases, for callers that carry tokens over several steps (continuous batching):
        `begin_rows` -> `recur_rows` (as many times as needed) -> `finish_rows`.
        """
        r = self.fixed_budget(settings) if idx.size(1) == 1 and not prompt else None
        if r is not None:
            logits, state = self.decode_fixed(idx, kv, r, init_state=init_state, warm=warm, generators=generators)
            return logits, torch.full((idx.size(0),), r, dtype=torch.long, device=idx.device), state
        flight = self.begin_rows(idx, kv, settings, init_state=init_state, warm=warm, generators=generators,
                                 prompt=prompt)
        self.recur_rows(flight, kv)
        logits, state = self.finish_rows(flight, kv, lengths)
        return logits, flight.done, state

    def fixed_budget(self, settings: Sequence[DecodeSettings]) -> int | None:
        """The budget r when every row runs exactly r recurrences (same r, no exit rule): a `decode_fixed` step."""
        r = settings[0].num_recur
        fixed = self.config.is_recursive and all(s.exit is None and s.num_recur == r for s in settings)
        return r if fixed else None

    @torch.no_grad()
    def decode_fixed(
        self,
        idx: torch.Tensor,
        kv: BatchKV,
        num_recur: int,
        init_state: torch.Tensor | None = None,
        warm: torch.Tensor | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ):
        """One generated token per row (idx (B, 1)), every row at budget `num_recur` with no exit rule.

        Equals forward_rows on the same rows (arguments as there), without its per-recurrence bookkeeping: the token
        is one straight-line function (`fixed_token`), which compile_decode() turns into one graph.
        Returns (logits (B, V), final state (B, D)).
        """
        self._check_positions(kv)
        low = kv.filled_below()  # outside the graph: slots the recurrences read that a lazy fill left for later
        for slot in range(low if low is not None else num_recur, num_recur):
            kv.ensure_filled(slot)
        s0 = None
        if self.config.state_init == "noise":  # drawn here, outside the graph: each row's own generator
            s0 = self.initial_state(torch.empty(idx.size(0), 1, self.config.n_embd, dtype=self.wte.weight.dtype,
                                                device=idx.device), generators)
        out = self._fixed_token(idx, kv, num_recur, s0, init_state, warm)
        kv.settle(num_recur)
        return out

    def fixed_token(self, idx, kv: BatchKV, num_recur: int, s0=None, init_state=None, warm=None):
        """decode_fixed's token: prelude, `num_recur` recurrences, the cache fill above them, coda, head."""
        pool = kv.pool
        x, cos, sin = self._prelude(idx, kv)
        s = self._warm_start(self.initial_state(x) if s0 is None else s0, init_state, warm)
        for i in range(num_recur):
            slot = pool.slot_for_iter(i)
            s = self.recur_step(s, x, cos, sin, [LayerKV(kv, pool.recur_layer(j, slot))
                                                 for j in range(self.config.n_recur)])
        kv.fill_forward(num_recur)
        y = self._coda(s, cos, sin, kv)
        return self.head(y[:, -1]), s[:, -1]

    @torch.no_grad()
    def begin_rows(
        self,
        idx: torch.Tensor,
        kv: BatchKV,
        settings: Sequence[DecodeSettings],
        init_state: torch.Tensor | None = None,
        warm: torch.Tensor | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        prompt: bool = False,
    ) -> Flight:
        """Embedding + prelude of idx (B, T) at the positions `kv` holds, and each row's initial state (as in
        forward_rows).

        Returns the rows' Flight: tokens that have run no recurrence yet.
        """
        cfg = self.config
        B, T = idx.shape
        dev = idx.device
        self._check_positions(kv)
        x, _, _ = self._prelude(idx, kv)
        done = torch.zeros(B, dtype=torch.long, device=dev)
        if not cfg.is_recursive:
            return Flight(x, x, done.clone(), done, [None] * B)
        budget_list = [s.num_recur for s in settings]
        budgets = torch.tensor(budget_list, dtype=torch.long, device=dev)
        exits = [None] * B if prompt or T > 1 else [s.exit for s in settings]  # prompts run the full budget
        return Flight(x, self._warm_start(self.initial_state(x, generators), init_state, warm), budgets, done, exits,
                      fresh=(min(budget_list), max(budget_list)))

    @torch.no_grad()
    def recur_rows(self, flight: Flight, kv: BatchKV, max_steps: int | None = None) -> None:
        """Advance every unfinished row of `flight` by up to `max_steps` recurrences (default: until all finish).

        Rows may be at different recurrences (carried over from earlier steps): each row reads and writes the cache
        slot of its own recurrence. Only rows still recurring are gathered and run, so an exited or low-budget row
        costs nothing more and no row's result depends on its batch mates. Updates `flight` in place.
        """
        if not self.config.is_recursive:
            return
        pool, f = kv.pool, flight
        B = f.s.size(0)
        cos, sin = self._rotary_at(kv)
        checks = (_ExitChecks(f.exits, f.s.device, self.gate_prob if self.exit_gate is not None else None,
                              f.prev_logp) if any(x is not None for x in f.exits) else None)
        # The rows still recurring are kept compact across recurrences: gathered once, and again only when some of
        # them finish (whose states and counts are then written back); finished rows cost nothing.
        # `shared`: the recurrence every compact row is at, as a Python int (None: rows carried over from different
        # steps), so the loop below neither reads each row's slot nor compares each row's budget while no row can
        # have reached it.
        fresh, f.fresh = f.fresh, None  # no row has run a recurrence: the loop's shape is known without a tensor read
        rows = torch.arange(B, device=f.s.device) if fresh is not None else (~f.finished).nonzero().squeeze(1)
        if rows.numel() == B:  # every row: no gather at all
            s, e, c, sn, kv_a, it, budget = f.s, f.e, cos, sin, kv, f.done, f.budgets
        else:
            s, e, c, sn, kv_a = f.s[rows], f.e[rows], cos[rows], sin[rows], kv.rows(rows)
            it, budget = f.done[rows], f.budgets[rows]
        if fresh is not None:
            (least_budget, remaining), shared = fresh, 0
        else:
            remaining = int((f.budgets - f.done).max())
            lo = int(it.min()) if rows.numel() else 0
            shared = lo if rows.numel() and lo == int(it.max()) else None
            least_budget = int(budget.min()) if rows.numel() else 0
        steps = remaining if max_steps is None else min(remaining, max_steps)
        lazy = kv_a.filled_below()  # the first slot some row's earlier tokens may not hold yet (lazy cache fill)

        def write_back(local: torch.Tensor | None) -> None:  # rows[local] (None: all of them) leave the compact set
            idx, st, n = (rows, s, it) if local is None else (rows[local], s[local], it[local])
            f.s = st if idx.numel() == B else f.s.index_copy(0, idx, st)
            f.done[idx] = n

        for k in range(steps):
            if rows.numel() == 0:
                break
            slot = pool.slot_for_iter(shared + k) if shared is not None else pool.slots_for_iters(it)
            if lazy is not None and (slot if isinstance(slot, int) else int(slot.max())) >= lazy:
                kv_a.ensure_filled(slot)
                lazy = kv_a.filled_below()
            s_out = self.recur_step(s, e, c, sn, [LayerKV(kv_a, pool.recur_layer(j, slot))
                                                  for j in range(self.config.n_recur)])
            # None: no row can have spent its budget yet
            finished = None if shared is not None and shared + k + 1 < least_budget else it + 1 >= budget
            exited = None
            if checks is not None:
                probe = lambda sub, st=s_out, c=c, sn=sn, kv_a=kv_a: (  # noqa: E731
                    self._coda_logits(st, c, sn, kv_a) if isinstance(sub, slice)
                    else self._coda_logits(st[sub], c[sub], sn[sub], kv_a.rows(sub)))
                exited = checks.step(it, rows, s[:, -1], s_out[:, -1], probe)
                finished = exited if finished is None else finished | exited
            s, it = s_out, it + 1
            if finished is not None and bool(finished.any()):
                if exited is not None:
                    if rows.numel() == B:
                        f.exited |= exited
                    else:
                        f.exited[rows] |= exited
                if bool(finished.all()):  # the last rows: nothing left to gather
                    break
                write_back(finished.nonzero().squeeze(1))
                keep = (~finished).nonzero().squeeze(1)
                rows, s, e, c, sn, it, budget = rows[keep], s[keep], e[keep], c[keep], sn[keep], it[keep], budget[keep]
                kv_a = kv_a.rows(keep)
                lazy = kv_a.filled_below()
        if rows.numel():
            write_back(None)
        if checks is not None:
            f.prev_logp = checks.prev_logp

    @torch.no_grad()
    def finish_rows(self, flight: Flight, kv: BatchKV, lengths: torch.Tensor | None = None):
        """Coda + head of finished rows: copy each row's deepest recurrent entry into the slots above it
        (`BatchKV.fill_forward`), then (logits (B, V), final state (B, D)) at each row's last valid token (`lengths`,
        default T: right-padded prefill)."""
        x = flight.s
        B, T = x.shape[:2]
        if self.config.is_recursive:
            kv.fill_forward(flight.done)
        cos, sin = self._rotary_at(kv)
        y = self._coda(x, cos, sin, kv)
        if lengths is None:  # every row's last token (decoding: the only one)
            return self.head(y[:, -1]), x[:, -1]
        last = (lengths - 1).clamp_min(0)
        rows = torch.arange(B, device=x.device)
        return self.head(y[rows, last]), x[rows, last]  # the head only where a token is sampled

    def _check_positions(self, kv: BatchKV) -> None:
        if int(kv.positions.max()) >= self.config.sequence_len:
            raise ValueError(f"position {int(kv.positions.max())} exceeds sequence_len={self.config.sequence_len}")

    @staticmethod
    def _warm_start(s: torch.Tensor, init_state: torch.Tensor | None, warm: torch.Tensor | None) -> torch.Tensor:
        """s0 (B, T, D) with the rows of mask `warm` (default: all) starting from init_state (B, D) instead."""
        if init_state is None:
            return s
        B = s.size(0)
        warm = torch.ones(B, dtype=torch.bool, device=s.device) if warm is None else warm
        return torch.where(warm[:, None, None], init_state.view(B, 1, -1).to(s.dtype), s)

    def _rotary_at(self, kv: BatchKV):
        # kept on the view: prelude, recurrences and coda of one step read the same rows' positions
        if kv.rotary is None:
            positions = kv.positions
            kv.rotary = self.cos[0][positions], self.sin[0][positions]  # (B, T, 1, Dh/2)
        return kv.rotary

    def _coda_logits(self, x, cos, sin, kv: BatchKV) -> torch.Tensor:
        return self.head(self._coda(x, cos, sin, kv))

    # --- accounting -----------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def effective_depth(self, num_recur: int | None = None) -> int:
        return self.config.effective_depth(num_recur)

    def flops_per_token(self, num_recur: int | None = None, training: bool = True, bptt_k: int | None = None,
                        supervise: int = 1) -> float:
        """Matmul + attention FLOPs per token (forward 2N, backward 4N only for differentiated recurrences).

        `supervise` > 1 (deep supervision) runs the coda and head after that many recurrences instead of one.
        """
        cfg = self.config
        r = (cfg.decode.num_recur if num_recur is None else num_recur) if cfg.is_recursive else 0
        block = sum(p.numel() for p in self.recur[0].parameters()) if cfg.is_recursive else 0
        adapter = self.adapter.weight.numel() if self.adapter is not None else 0
        n_out = max(1, min(supervise, r)) if training and cfg.is_recursive else 1  # coda + head runs
        coda_head = sum(p.numel() for b in self.coda for p in b.parameters()) + self.lm_head.weight.numel()
        once = sum(p.numel() for b in self.prelude for p in b.parameters()) + n_out * coda_head
        per_iter = cfg.n_recur * block + adapter
        attn_per_layer = 2 * cfg.n_head * cfg.head_dim * cfg.sequence_len  # QK^T and AV, causal-averaged x2 fwd
        layers_once, layers_iter = cfg.n_prelude + n_out * cfg.n_coda, cfg.n_recur
        fwd = 2 * (once + r * per_iter) + attn_per_layer * (layers_once + r * layers_iter)
        if not training:
            return float(fwd)
        k = min(r, cfg.recurrence.bptt_k if bptt_k is None else bptt_k)
        bwd = 2 * (2 * (once + k * per_iter) + attn_per_layer * (layers_once + k * layers_iter))
        return float(fwd + bwd)


class Flight:
    """Tokens part-way through the recurrent block: B rows of T tokens, each row at its own recurrence.

    e: prelude output (B, T, D), re-injected at every recurrence; s: current state (B, T, D); budgets / done (B,):
    recurrences allowed / run so far; exited (B,): the row's exit rule fired; exits: each row's ExitRule (None = run
    the budget); prev_logp (B, V): next-token log-probs after the previous recurrence, for logit-based exit rules.
    A continuous-batching step carries unfinished rows over to the next step (`row`, `cat`).
    """

    __slots__ = ("e", "s", "budgets", "done", "exited", "exits", "prev_logp", "fresh")

    def __init__(self, e, s, budgets, done, exits, exited=None, prev_logp=None, fresh=None):
        self.e, self.s, self.budgets, self.done, self.exits = e, s, budgets, done, list(exits)
        self.exited = torch.zeros_like(done, dtype=torch.bool) if exited is None else exited
        self.prev_logp = prev_logp
        self.fresh = fresh  # (least, largest budget) while no row has run a recurrence; None: read the tensors

    @property
    def finished(self) -> torch.Tensor:
        return self.exited | (self.done >= self.budgets)

    def rows(self, idx: torch.Tensor) -> Flight:
        """The rows `idx` (a 1-d index tensor) as their own Flight."""
        return Flight(self.e[idx], self.s[idx], self.budgets[idx], self.done[idx],
                      [self.exits[i] for i in idx.tolist()], self.exited[idx],
                      None if self.prev_logp is None else self.prev_logp[idx])

    @staticmethod
    def cat(flights: Sequence[Flight]) -> Flight:
        """One Flight over the rows of several (same T)."""
        prev = None
        if any(f.prev_logp is not None for f in flights):
            V = next(f.prev_logp for f in flights if f.prev_logp is not None).size(-1)
            # rows without a previous distribution never read it: they have not run a recurrence with a logit rule
            prev = torch.cat([f.prev_logp if f.prev_logp is not None else
                              torch.zeros(f.done.numel(), V, dtype=torch.float32, device=f.done.device)
                              for f in flights])
        return Flight(torch.cat([f.e for f in flights]), torch.cat([f.s for f in flights]),
                      torch.cat([f.budgets for f in flights]), torch.cat([f.done for f in flights]),
                      [x for f in flights for x in f.exits], torch.cat([f.exited for f in flights]), prev)


class _ExitChecks:
    """The exit rules of one call's rows, evaluated per criterion so rows with different rules share a step.

    `prev_logp` (B, V) carries the previous recurrence's distributions of rows resumed from an earlier step.
    """

    def __init__(self, exits: list[ExitRule | None], device: torch.device, gate_prob=None,
                 prev_logp: torch.Tensor | None = None):
        if gate_prob is None and any(x is not None and x.impl.uses_gate for x in exits):
            raise ValueError("exit criterion 'learned' needs a model with an exit gate (GPTConfig.exit_gate=true)")
        self.gate_prob = gate_prob  # the model's GPT.gate_prob, or None without a gate
        self.n = len(exits)
        # the common case, one rule for every row: no per-row tensors and no per-criterion gathers at each
        # recurrence; the threshold and min_recur are plain numbers (the checks run at every recurrence of every step)
        self.uniform = exits[0] if len(set(exits)) == 1 and exits[0] is not None else None
        if self.uniform:
            self.groups = {self.uniform.criterion: None}
        else:
            self.threshold = torch.tensor([x.threshold if x else 0.0 for x in exits], dtype=torch.float64,
                                          device=device)
            self.min_recur = torch.tensor([x.min_recur if x else 1 for x in exits], dtype=torch.long, device=device)
            names = sorted({x.criterion for x in exits if x is not None})
            self.groups = {n: torch.tensor([x is not None and x.criterion == n for x in exits], device=device)
                           for n in names}
        self.prev_logp = prev_logp  # (B, V): each row has one criterion, so one store serves every logit rule

    def step(self, it: torch.Tensor, idx: torch.Tensor, s_prev: torch.Tensor, s_new: torch.Tensor,
             probe) -> torch.Tensor:
        """Rows `idx` (n,) just ran their recurrence `it` (n,, 0-based); returns which of them exit now (bool (n,)).

        `probe(local)` gives the coda logits (m, 1, V) of the rows at positions `local` of idx (a slice: all of them),
        computed only when a criterion needs them. A row has a previous distribution iff it > 0 (it ran every
        recurrence before).
        """
        rule = self.uniform
        exiting = None if rule else torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
        for name, member in self.groups.items():
            if rule:  # every row: no per-row gathers
                local, rows, it_l, prev, new = slice(None), idx, it, s_prev, s_new
            else:
                local = member[idx].nonzero().squeeze(1)
                if local.numel() == 0:
                    continue
                rows, it_l, prev, new = idx[local], it[local], s_prev[local], s_new[local]
            crit = EXIT_CRITERIA[name]
            logp_prev = logp_new = None
            if crit.uses_logits:
                logp_new = F.log_softmax(probe(local)[:, -1], dim=-1)
                if self.prev_logp is None:
                    self.prev_logp = torch.zeros(self.n, logp_new.size(-1), dtype=logp_new.dtype,
                                                 device=idx.device)
                logp_prev = self.prev_logp[rows] if bool((it_l > 0).any()) else None
                self.prev_logp[rows] = logp_new.to(self.prev_logp.dtype)
            gate = self.gate_prob(new) if crit.uses_gate else None
            threshold = rule.threshold if rule else self.threshold[rows].to(s_new.dtype)
            conv = crit.converged(prev, new, logp_prev, logp_new, threshold, gate)
            if crit.uses_logits:
                conv = conv & (it_l > 0)  # nothing to compare with after a row's first recurrence
            if rule:
                return conv & (it_l + 1 >= rule.min_recur) if rule.min_recur > 1 else conv
            exiting[local] = conv & (it_l + 1 >= self.min_recur[rows])
        return exiting


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
