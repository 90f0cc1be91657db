"""Continuous batching: per-row settings, rows joining and leaving, compute that follows exits, batch invariance."""

from __future__ import annotations

import pytest
import torch

from recursive_model import GPT, GPTConfig, Tokenizer
from recursive_model.batching import ContinuousEngine, QueueFull, RequestTooLarge, SamplingParams
from recursive_model.recurrence import DecodeSettings, ExitRule

TEXT = ["the recurrent block is applied r times to the state.", "hello world 12 + 34 = 46", "ab" * 50] * 20
STRATEGIES = ["exact", "ring:2", "final"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(TEXT), vocab_size=300)


def contractive_model(vocab: int, seed: int = 0, **overrides) -> GPT:
    """float64, every weight random, the state entering the adapter weakly: a contraction whose tokens converge after
    different numbers of recurrences, so latent and kl exits fire at varied depths (the default init converges at 2)."""
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("tiny", vocab_size=vocab, recurrence=dict(r_max=8), **overrides)
    model = GPT(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.12)
        model.adapter.weight[:, cfg.n_embd:] *= 0.3
    return model


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return contractive_model(tokenizer.vocab_size)


def run(engine: ContinuousEngine, requests: list[tuple[list[int], SamplingParams, DecodeSettings]],
        join_at: dict[int, int] | None = None) -> list[list[tuple[int, int]]]:
    """Drive the engine to the end; request i is submitted before step join_at[i] (default 0).
    Returns per request the (token, recurrences) it produced."""
    join_at = join_at or {}
    out: dict[int, list[tuple[int, int]]] = {}
    ids: dict[int, int] = {}  # sequence id -> request index
    step = 0
    while len(ids) < len(requests) or engine.has_work:
        for i, req in enumerate(requests):
            if i not in out and join_at.get(i, 0) <= step:
                ids[engine.submit(*req)] = i
                out[i] = []
        for ev in engine.step():
            if ev.step is not None:
                out[ids[ev.seq_id]].append((ev.step.token, ev.step.num_recur))
        step += 1
    return [out[i] for i in range(len(requests))]


def engine_for(model, tokenizer, strategy: str, **kw) -> ContinuousEngine:
    return ContinuousEngine(model, tokenizer, kv_cache=strategy, max_recur=8, kv_tokens=512, block_size=4, **kw)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33]]
RULES = [None, ExitRule(criterion="latent", threshold=0.05), ExitRule(criterion="kl", threshold=1e-3, min_recur=2)]


def mixed_requests(strategy: str, warm: bool) -> list[tuple[list[int], SamplingParams, DecodeSettings]]:
    """PROMPTS with different budgets and exit rules (none, latent, kl)."""
    return [(p, GREEDY, DecodeSettings(num_recur=[8, 3, 6, 8, 5][i], kv_cache=strategy, exit=RULES[i % 3],
                                       warm_start=warm)) for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("min_step_recur", [None, 1, 3])
def test_rows_are_batch_invariant_for_every_strategy_exit_rule_and_join_time(model, tokenizer, strategy, warm,
                                                                              min_step_recur):
    """Greedy: each row's tokens and per-token recurrences are identical alone and in any batch, joining mid-way too,
    and whether or not deeper rows' tokens are carried over several steps (min_step_recur)."""
    requests = mixed_requests(strategy, warm)
    alone = [run(engine_for(model, tokenizer, strategy), [r])[0] for r in requests]
    together = run(engine_for(model, tokenizer, strategy, min_step_recur=min_step_recur), requests)
    staggered = run(engine_for(model, tokenizer, strategy, min_step_recur=min_step_recur), requests,
                    join_at={1: 2, 3: 5, 4: 9})
    assert together == alone
    assert staggered == alone
    recurs = {u for row in alone for _, u in row}
    assert len(recurs) >= 3  # the mix really exercises different depths per token
    exited = [u for i, row in enumerate(alone) if RULES[i % 3] is not None for _, u in row[1:]]
    assert min(exited) < 8  # and the exit rules do fire


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_windowed_attention_rows_are_batch_invariant(tokenizer, strategy):
    """A local attention window (GPTConfig.attn_window) is part of every row's cache mask: rows with different budgets
    and exit rules give the same tokens and recurrences alone, together and joining mid-way."""
    model = contractive_model(tokenizer.vocab_size, attn_window=3, coda_window=4)
    requests = mixed_requests(strategy, warm=False)
    alone = [run(engine_for(model, tokenizer, strategy), [r])[0] for r in requests]
    assert run(engine_for(model, tokenizer, strategy), requests) == alone
    assert run(engine_for(model, tokenizer, strategy, min_step_recur=1), requests, join_at={1: 2, 4: 6}) == alone
    full = run(engine_for(contractive_model(tokenizer.vocab_size), tokenizer, strategy), requests)
    assert full != alone  # the window changes what the rows attend to


def test_compute_follows_exits_and_budgets(model, tokenizer):
    """The recurrent block runs only the rows still recurring: row-recurrences computed == recurrences reported."""
    calls: list[int] = []
    original = model.recur_step

    def counting(s, e, cos, sin, kvs=None):
        calls.append(s.size(0))
        return original(s, e, cos, sin, kvs)

    model.recur_step = counting
    try:
        engine = engine_for(model, tokenizer, "exact")
        reqs = [([5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0), DecodeSettings(num_recur=8)),
                ([9, 10], SamplingParams(max_tokens=6, temperature=0.0), DecodeSettings(num_recur=2)),
                ([11, 12], SamplingParams(max_tokens=6, temperature=0.0),
                 DecodeSettings(num_recur=8, exit=ExitRule(criterion="latent", threshold=0.05)))]
        ids = {engine.submit(*r): i for i, r in enumerate(reqs)}
        engine.step()  # admission: three one-row prompt forwards
        calls.clear()
        spent = 0
        while engine.has_work:
            for ev in engine.step():
                spent += ev.step.num_recur if ev.step is not None else 0
        assert ids and sum(calls) == spent  # nothing computed for exited / low-budget rows
        assert 1 in calls and max(calls) == 3  # late recurrences ran on fewer rows than the batch
    finally:
        del model.recur_step


def test_low_budget_rows_get_a_token_every_step_next_to_deep_rows(model, tokenizer):
    """min_step_recur=1: a step lasts as long as its shallowest row; deep rows' tokens are carried over, so an r=1
    row emits at every step and an r=8 row once per 8 steps, each having run exactly its budget."""
    engine = engine_for(model, tokenizer, "exact", min_step_recur=1)
    calls: list[int] = []
    original = model.recur_step

    def counting(s, e, cos, sin, kvs=None):
        calls.append(s.size(0))
        return original(s, e, cos, sin, kvs)

    deep = engine.submit([5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0), DecodeSettings(num_recur=8))
    low = engine.submit([9, 10], SamplingParams(max_tokens=20, temperature=0.0), DecodeSettings(num_recur=1))
    model.recur_step = counting
    try:
        per_step: list[dict[int, int]] = []
        per_step_calls: list[int] = []
        while engine.has_work:
            calls.clear()
            per_step.append({ev.seq_id: ev.step.num_recur for ev in engine.step() if ev.step is not None})
            per_step_calls.append(len(calls))
    finally:
        del model.recur_step
    assert [i for i, s in enumerate(per_step) if low in s] == list(range(20))  # a token every step, from the first
    deep_recurs = [s[deep] for s in per_step if deep in s]
    assert len(deep_recurs) == 6 and set(deep_recurs) == {8}  # carried tokens still run their whole budget
    # the deep prompt [5, 6] is prefilled over steps 0-7, its last token 7 decoded over steps 7-14 (it joins the
    # decoding rows in the step its prefill ends)
    assert [i for i in range(20) if deep in per_step[i]] == [14]
    # one recurrence per step: the deep prompt chunk's own call (steps 0-7; at step 0 also the low prompt's [9]) + ONE
    # call for the decoding rows, deep and low rows together although they are at different recurrences (steps 8-19)
    assert per_step_calls[:20] == [3] + [2] * 7 + [1] * 12
    with pytest.raises(ValueError, match="min_step_recur=0"):
        engine_for(model, tokenizer, "exact", min_step_recur=0)


def test_pool_blocks_are_freed_and_reused_and_admission_waits_for_memory(model, tokenizer):
    engine = ContinuousEngine(model, tokenizer, kv_cache="exact", max_recur=4, kv_tokens=32, block_size=4)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    a = engine.submit([1, 2, 3, 4, 5, 6, 7, 8], params, DecodeSettings(num_recur=2))  # 16 tokens = 4 blocks
    b = engine.submit([1, 2, 3, 4, 5, 6, 7, 8], params, DecodeSettings(num_recur=2))
    c = engine.submit([9, 9, 9, 9, 9, 9, 9, 9], params, DecodeSettings(num_recur=2))  # does not fit yet
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1 and engine.pool.free_blocks == 0
    finished: dict[int, list[int]] = {a: [], b: [], c: []}
    while engine.has_work:
        for ev in engine.step():
            finished[ev.seq_id].append(ev.step.token)
    assert engine.pool.free_blocks == engine.pool.num_blocks
    assert finished[a] == finished[b] and len(finished[c]) == 8


def test_cancel_frees_the_row_at_the_next_step(model, tokenizer):
    engine = engine_for(model, tokenizer, "exact")
    sid = engine.submit([1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0), DecodeSettings(num_recur=2))
    engine.step()
    used = engine.pool.used_blocks
    assert used > 0
    engine.cancel(sid)
    events = engine.step()
    assert [(e.seq_id, e.finished, e.finish_reason) for e in events] == [(sid, True, "cancelled")]
    assert engine.pool.used_blocks == 0 and not engine.has_work


def test_queue_limits_and_impossible_requests_fail_at_once(model, tokenizer):
    engine = ContinuousEngine(model, tokenizer, kv_cache="exact", max_recur=4, kv_tokens=32, block_size=4,
                              max_waiting=1)
    d = DecodeSettings(num_recur=2)
    engine.submit([1, 2], SamplingParams(max_tokens=4), d)
    with pytest.raises(QueueFull, match="max_waiting=1"):
        engine.submit([1, 2], SamplingParams(max_tokens=4), d)
    with pytest.raises(RequestTooLarge, match="exceed the KV pool"):
        engine.check([1] * 20, SamplingParams(max_tokens=20), d)
    with pytest.raises(ValueError, match="max_recur=4"):
        engine.check([1], SamplingParams(max_tokens=2), DecodeSettings(num_recur=5))
    with pytest.raises(ValueError, match="KV pool is 'exact'"):
        engine.check([1], SamplingParams(max_tokens=2), DecodeSettings(num_recur=2, kv_cache="final"))
    with pytest.raises(ValueError, match=r"token id 999 out of range \[0, "):
        engine.check([999], SamplingParams(max_tokens=2), d)


@pytest.mark.parametrize("field, kwargs", [("temperature", dict(temperature=-0.5)), ("top_k", dict(top_k=0)),
                                           ("max_tokens", dict(max_tokens=0)), ("temperature",
                                                                               dict(temperature=float("nan")))])
def test_sampling_params_name_the_bad_field(field, kwargs):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_sampled_rows_depend_on_their_own_seed_only(model, tokenizer):
    d = DecodeSettings(num_recur=3)
    sampled = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=11)
    alone = run(engine_for(model, tokenizer, "exact"), [([5, 6], sampled, d)])[0]
    mates = [([7, 8, 9], SamplingParams(max_tokens=5, temperature=1.0, seed=3), d.replace(num_recur=6)),
             ([1], GREEDY, d)]
    together = run(engine_for(model, tokenizer, "exact"), [mates[0], ([5, 6], sampled, d), mates[1]])[1]
    assert together == alone
    other_seed = run(engine_for(model, tokenizer, "exact"), [([5, 6], SamplingParams(
        max_tokens=8, temperature=1.0, top_k=20, seed=12), d)])[0]
    assert other_seed != alone


def test_noise_state_init_is_reproducible_and_batch_invariant(tokenizer):
    model = contractive_model(tokenizer.vocab_size, state_init="noise")
    d = DecodeSettings(num_recur=4, exit=ExitRule(criterion="latent", threshold=0.05))
    req = ([5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0, seed=4), d)
    alone = run(engine_for(model, tokenizer, "exact"), [req])[0]
    torch.manual_seed(123)  # the global RNG must not matter
    together = run(engine_for(model, tokenizer, "exact"), [([9, 9], GREEDY, d), req])[1]
    assert together == alone


def compiled_run(model: GPT, fn):
    """fn() after model.compile_decode(backend='aot_eager'), and how many graphs torch built meanwhile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model.compile_decode(backend="aot_eager")
    try:
        return fn(), counters["stats"]["unique_graphs"]
    finally:
        model.uncompile_decode()
        torch._dynamo.reset()


@pytest.mark.parametrize("min_step_recur", [None, 1])
def test_compiled_decode_equals_eager_with_graphs_bounded_by_blocks(tokenizer, min_step_recur):
    """compile_decode: one graph family per block whatever r, batch size, cache length or exit pattern, also when
    carried tokens put a step's rows at different recurrences (per-row cache slots)."""
    model = contractive_model(tokenizer.vocab_size)
    requests = [(p, GREEDY, DecodeSettings(num_recur=r, exit=rule))
                for p, r, rule in zip(PROMPTS, [8, 1, 5, 3, 2], RULES + RULES, strict=False)]
    eager = run(engine_for(model, tokenizer, "exact"), requests, join_at={2: 3})
    engine = engine_for(model, tokenizer, "exact", min_step_recur=min_step_recur)
    compiled, graphs = compiled_run(model, lambda: run(engine, requests, join_at={2: 3}))
    assert compiled == eager
    n_blocks = model.config.n_prelude + model.config.n_recur + model.config.n_coda
    assert 0 < graphs <= 2 * n_blocks, graphs  # batch 1 may specialise once; r and exits never recompile


def _recurrences_per_token(engine: ContinuousEngine, decode: DecodeSettings) -> list[int]:
    rid = engine.submit([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0), decode)
    recurs = []
    while engine.has_work:
        recurs += [ev.step.num_recur for ev in engine.step() if ev.seq_id == rid and ev.step is not None]
    return recurs


def test_learned_exit_fires_on_the_gate(tokenizer):
    model = contractive_model(tokenizer.vocab_size, exit_gate=True)
    engine = engine_for(model, tokenizer, "exact")
    learned = ExitRule(criterion="learned", threshold=0.5)
    with torch.no_grad():  # a gate that always says "stop", then one that never does
        model.exit_gate.weight.zero_()
        model.exit_gate.bias.fill_(20.0)
    # the first token (the last prompt token's output) exits on the gate like every generated one
    assert _recurrences_per_token(engine, DecodeSettings(num_recur=6, exit=learned)) == [1, 1, 1, 1]
    assert _recurrences_per_token(engine, DecodeSettings(num_recur=6, exit=ExitRule(
        criterion="learned", threshold=0.5, min_recur=3))) == [3, 3, 3, 3]
    with torch.no_grad():
        model.exit_gate.bias.fill_(-20.0)
    assert _recurrences_per_token(engine, DecodeSettings(num_recur=6, exit=learned)) == [6, 6, 6, 6]


def test_learned_exit_needs_a_gate(model, tokenizer):
    learned = ExitRule(criterion="learned", threshold=0.5)
    with pytest.raises(ValueError, match="needs exit_gate=true"):
        GPTConfig.from_preset("tiny", decode=dict(exit=learned))
    with pytest.raises(ValueError, match="exit_gate=true needs a recurrent block"):
        GPTConfig.from_preset("tiny", n_recur=0, exit_gate=True)
    with pytest.raises(ValueError, match="no exit gate"):
        engine_for(model, tokenizer, "exact").submit([5], GREEDY, DecodeSettings(exit=learned))


def _fixed_budget_requests(strategy: str, warm: bool, r: int = 5):
    return [(p, SamplingParams(max_tokens=7, temperature=0.0, seed=i),
             DecodeSettings(num_recur=r, kv_cache=strategy, warm_start=warm)) for i, p in enumerate(PROMPTS[:3])]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("state_init", ["embed", "noise"])
def test_fixed_budget_token_equals_the_phased_token(tokenizer, strategy, warm, state_init):
    """A step whose rows share one budget and no exit rule runs `decode_fixed` (one straight-line token); it equals the
    phased begin/recur/finish path token for token, and leaves the same KV pool behind (ring fill included)."""
    model = contractive_model(tokenizer.vocab_size, state_init=state_init)
    requests = _fixed_budget_requests(strategy, warm)
    fixed_calls = []
    original = model.decode_fixed
    model.decode_fixed = lambda *a, **k: fixed_calls.append(1) or original(*a, **k)
    fast_engine = engine_for(model, tokenizer, strategy)
    fast = run(fast_engine, requests, join_at={2: 3})
    del model.decode_fixed
    model.fixed_budget = lambda settings: None  # every step through begin_rows / recur_rows / finish_rows
    slow_engine = engine_for(model, tokenizer, strategy)
    phased = run(slow_engine, requests, join_at={2: 3})
    assert len(fixed_calls) > 5
    assert fast == phased
    assert all(u == 5 for row in fast for _, u in row)
    for name in ("k_flat", "v_flat"):
        torch.testing.assert_close(getattr(fast_engine.pool, name), getattr(slow_engine.pool, name), rtol=0, atol=1e-12)


def test_compiled_fixed_budget_token_equals_eager_with_one_graph_per_budget(tokenizer):
    model = contractive_model(tokenizer.vocab_size)
    budgets = [3, 1, 6]

    def all_budgets():
        return [run(engine_for(model, tokenizer, "ring:2"), _fixed_budget_requests("ring:2", True, r)) for r in budgets]

    eager = all_budgets()
    compiled, frames = compiled_run(model, all_budgets)
    assert compiled == eager
    n_blocks = model.config.n_prelude + model.config.n_recur + model.config.n_coda
    # the whole-token graph once per budget (batch 1 may specialise once more), plus the per-block graphs of the
    # prompt-token steps; batch size and cache length never recompile
    assert 0 < frames <= 2 * len(budgets) + 2 * n_blocks, frames


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("depths", [[3, 3, 3, 3], [2, 5, 5, 2], [1, 2, 3, 6], [6, 6, 2, 6], [6, 6, 6, 6]])
def test_cache_fill_copies_each_rows_deepest_entry_into_every_slot_above(depths, lazy):
    """BatchKV.fill_forward (one or two depths: a broadcast write per depth; more: one gather/scatter) against the
    definition: (row, token, slot, layer) holds the row's entry at slot min(slot, depth - 1) -- at once, or with the
    lazy fill once a later step's recurrences have asked for every slot (ensure_filled)."""
    from recursive_model.kv_cache import BatchKV, KVPool, SequenceKV

    cfg = GPTConfig.from_preset("tiny", n_prelude=1, n_recur=2, n_coda=1)
    pool = KVPool(cfg, num_blocks=12, block_size=4, strategy="exact", num_recur=6)
    g = torch.Generator().manual_seed(0)
    pool.k_flat.copy_(torch.randn(pool.k_flat.shape, generator=g))
    pool.v_flat.copy_(torch.randn(pool.v_flat.shape, generator=g))
    seqs = []
    for length in (1, 4, 6, 9):  # rows whose two new tokens start inside a block and across a block boundary
        seq = SequenceKV(length=length)
        pool.allocate(seq, length + 2)
        seqs.append(seq)
    pool.lazy = lazy
    for seq, deepest in zip(seqs, (0, 2, 4, 6), strict=True):  # lazy: levels of sequences that decoded before
        seq.deepest = deepest
    kv = BatchKV.build(pool, seqs, 2, "cpu")
    before_k, before_v = pool.k.clone(), pool.v.clone()
    kv.fill_forward(torch.tensor(depths))
    if lazy:
        for seq in seqs:
            seq.length += 2
        later = BatchKV.build(pool, seqs, 1, "cpu")
        for slot in range(pool.n_slots):
            later.ensure_filled(slot)
        for seq in seqs:
            seq.length -= 2
    for b, (seq, depth) in enumerate(zip(seqs, depths, strict=True)):
        for pos in range(seq.length, seq.length + 2):
            blk, off = seq.blocks[pos // pool.block_size], pos % pool.block_size
            for slot in range(pool.n_slots):
                for j in range(pool.n_recur):
                    src = pool.recur_layer(j, min(slot, depth - 1))
                    dst = pool.recur_layer(j, slot)
                    assert torch.equal(pool.k[dst, blk, off], before_k[src, blk, off]), (b, pos, slot, j)
                    assert torch.equal(pool.v[dst, blk, off], before_v[src, blk, off]), (b, pos, slot, j)
    # nothing else moved: prelude and coda layers, and every other token (the prompt's first tokens ran every slot)
    touched = torch.zeros(pool.k.shape[:3], dtype=torch.bool)
    for seq in seqs:
        for pos in range(seq.length, seq.length + 2):
            touched[:, seq.blocks[pos // pool.block_size], pos % pool.block_size] = True
    assert torch.equal(pool.k[~touched], before_k[~touched]) and torch.equal(pool.v[~touched], before_v[~touched])


@pytest.mark.parametrize("min_step_recur", [None, 1])
def test_lazy_cache_fill_gives_the_same_tokens_as_filling_every_slot_at_once(model, tokenizer, monkeypatch,
                                                                           min_step_recur):
    """exact fills an exited token's upper slots only up to its sequence's deepest decoded recurrence, and catches up
    just before a deeper recurrence reads them: tokens and recurrences equal the eager fill's, rows joining mid-way."""
    from recursive_model.kv_cache import BatchKV

    requests = mixed_requests("exact", warm=False)
    eager_engine = engine_for(model, tokenizer, "exact", min_step_recur=min_step_recur)
    eager_engine.pool.lazy = False
    eager = run(eager_engine, requests, join_at={1: 2, 3: 5, 4: 9})
    catch_ups = []
    original = BatchKV.ensure_filled
    monkeypatch.setattr(BatchKV, "ensure_filled", lambda self, slot: catch_ups.append(slot) or original(self, slot))
    lazy_engine = engine_for(model, tokenizer, "exact", min_step_recur=min_step_recur)
    assert lazy_engine.pool.lazy
    assert run(lazy_engine, requests, join_at={1: 2, 3: 5, 4: 9}) == eager
    assert catch_ups  # some recurrence went deeper than its sequence's earlier tokens were filled
