"""Model core: config validation, presets, recurrence sampling, injection, truncated BPTT, compile, KV caches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from recursive_model import GPT, GPTConfig, sample_num_recur
from recursive_model.kv_cache import KVCache
from recursive_model.model import parameter_counts
from recursive_model.recurrence import EXIT_CRITERIA, DecodeSettings, ExitRule, RecurrenceSampling
from recursive_model.sampling import recur_generator


def randomized(cfg: GPTConfig, seed: int = 0, std: float = 0.2) -> GPT:
    """A model with every weight random (the default init zeroes output projections, which hides bugs)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


# --- config -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=0), "n_embd"),
        (dict(recurrence=dict(sigma=0.0)), r"RecurrenceSampling\.sigma=0\.0"),
        (dict(recurrence=dict(sigma=50.0)), r"RecurrenceSampling\.sigma=50\.0.*\(0, 4\.0\]"),
        (dict(recurrence=dict(mean=20.0)), r"RecurrenceSampling\.mean=20\.0.*r_max=4"),
        (dict(inject_mode="mul"), "inject_mode"),
        (dict(state_init="ones"), "state_init"),
        (dict(decode=dict(kv_cache="ring:0")), "kv_cache"),
        (dict(decode=dict(kv_cache="lru")), "kv_cache"),
        (dict(decode=dict(exit="entropy:0.1")), r"ExitRule\.criterion='entropy'.*\['kl', 'latent', 'learned'\]"),
        (dict(decode=dict(num_recur=0)), r"DecodeSettings\.num_recur=0"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(attn_window=-1), r"attn_window=-1.*\[0, inf\]"),
        (dict(attn_window=2.5), r"attn_window=2\.5 must be an int"),
        (dict(coda_window=-2), r"coda_window=-2.*\[0, inf\]"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig.from_preset("tiny", **overrides)


def test_config_unknown_field_and_preset():
    with pytest.raises(ValueError, match="unknown field.*bogus"):
        GPTConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown model preset 'd99'.*tiny"):
        GPTConfig.from_preset("d99")


def test_config_round_trip():
    cfg = GPTConfig.from_preset("cpu-small", recurrence=dict(sigma=0.7),
                                decode=dict(exit=ExitRule(criterion="kl", threshold=1e-3, min_recur=2)))
    assert cfg.recurrence == RecurrenceSampling(mean=3.0, sigma=0.7, r_max=8, bptt_k=3)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_format_1_flat_recurrence_keys_still_load():
    """config.json of older checkpoints had flat recurrence fields; they land in the typed sub-configs."""
    flat = {k: v for k, v in GPTConfig.from_preset("tiny").to_dict().items() if k not in ("recurrence", "decode")}
    flat.update(train_recur_mean=3.0, train_recur_max=8, recur_sigma=0.7, bptt_k=2, eval_recur=5, kv_cache="ring:2",
                recur_warm_start=True, exit_criterion="kl", exit_threshold=1e-3, exit_min_recur=2)
    cfg = GPTConfig.from_dict(flat)
    assert cfg.recurrence == RecurrenceSampling(mean=3.0, sigma=0.7, r_max=8, bptt_k=2)
    assert cfg.decode == DecodeSettings(num_recur=5, kv_cache="ring:2", warm_start=True,
                                        exit=ExitRule(criterion="kl", threshold=1e-3, min_recur=2))


def test_exit_rule_parse_and_registry():
    assert ExitRule.parse("kl:5e-4") == ExitRule(criterion="kl", threshold=5e-4)
    assert ExitRule.parse("latent:1e-3:2") == ExitRule(criterion="latent", threshold=1e-3, min_recur=2)
    assert str(ExitRule.parse("latent:0.001:2")) == "latent:0.001:2"
    assert set(EXIT_CRITERIA) == {"kl", "latent", "learned"}
    for bad, field in [("kl", "criterion:threshold"), ("kl:abc", "criterion:threshold"), ("kl:-1", "threshold"),
                       ("entropy:1", "criterion"), ("kl:1:0", "min_recur")]:
        with pytest.raises(ValueError, match=field):
            ExitRule.parse(bad)
    s = DecodeSettings(num_recur=8, exit=ExitRule.parse("kl:1e-3"))
    assert hash(s) == hash(DecodeSettings.from_dict(s.to_dict())) and s.label == "r8 kl:0.001"


def test_reference_parameter_counts():
    rec = parameter_counts(GPTConfig.from_preset("d20-recursive"))["total"]
    base = parameter_counts(GPTConfig.from_preset("d20"))["total"]
    assert abs(rec - 328e6) / 328e6 < 0.01, rec
    assert abs(base - 561e6) / 561e6 < 0.01, base
    assert GPTConfig.from_preset("d20-recursive").effective_depth() == 20
    assert GPTConfig.from_preset("d20").effective_depth() == 20
    assert GPTConfig.from_preset("d20-recursive").effective_depth(16) == 2 + 4 * 16 + 2


def test_the_head_runs_only_where_a_target_counts_and_the_loss_is_unchanged():
    """Chat stages train a few positions per sequence: the loss and its gradients equal cross-entropy over every
    position's logits with ignore_index=-1, computed by the head on the trained positions only."""
    model = randomized(GPTConfig.from_preset("tiny"), std=0.1).double()
    y = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    flat = torch.randint(0, 512, (21,))
    flat[torch.tensor([0, 1, 4, 5, 9, 13, 20])] = -1
    ours = model._token_losses(y, flat)
    ours.sum().backward()
    g_ours, gw_ours = y.grad.clone(), model.lm_head.weight.grad.clone()
    y.grad, model.lm_head.weight.grad = None, None
    ref = torch.nn.functional.cross_entropy(model.head(y).view(21, -1), flat, ignore_index=-1, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, y.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw_ours, model.lm_head.weight.grad, rtol=1e-12, atol=1e-12)
    assert (ours[flat == -1] == 0).all()
    # the whole model, scoring: the loss at r equals cross-entropy over the logits the model returns at r
    x = torch.randint(0, 512, (3, 7))
    with torch.no_grad():
        loss = model(x, targets=flat.view(3, 7), num_recur=3, loss_reduction="none")
        logits = model(x, num_recur=3)
    ref = torch.nn.functional.cross_entropy(logits.view(21, -1), flat, ignore_index=-1, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_tiny_forward_backward_is_fast_enough_to_use_everywhere():
    model = GPT(GPTConfig.from_preset("tiny")).train()
    x = torch.randint(0, 512, (4, 64))
    loss = model(x, targets=x, num_recur=4)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


# --- recurrence sampling ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean, sigma, r_max", [(4.0, 0.5, 16), (2.0, 0.5, 4), (3.0, 0.5, 8), (6.0, 1.0, 12)])
def test_sampled_mean_equals_configured_mean(mean, sigma, r_max):
    draws = sample_num_recur(mean, sigma, r_max, torch.Generator().manual_seed(1), size=100_000)
    assert abs(draws.double().mean().item() - mean) / mean < 0.02
    assert int(draws.min()) >= 1 and int(draws.max()) <= r_max
    assert draws.unique().numel() > 3  # a distribution, not a constant


def test_sampling_depends_only_on_seed_and_step():
    a = [sample_num_recur(4, 0.5, 16, recur_generator(7, step)) for step in range(50)]
    b = [sample_num_recur(4, 0.5, 16, recur_generator(7, step)) for step in range(50)]
    c = [sample_num_recur(4, 0.5, 16, recur_generator(8, step)) for step in range(50)]
    assert a == b and a != c


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mean"):
        sample_num_recur(20, 0.5, 16)
    with pytest.raises(ValueError, match="sigma"):
        sample_num_recur(4, 0.0, 16)


# --- injection and state init -----------------------------------------------------------------------------------------
def test_concat_adapter_is_identity_on_e_at_init():
    model = GPT(GPTConfig.from_preset("tiny"))
    e, s = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    assert torch.equal(model.inject(s, e), e)
    assert model.adapter.weight.shape == (32, 64)


def test_add_injection_mode():
    model = GPT(GPTConfig.from_preset("tiny", inject_mode="add"))
    assert model.adapter is None
    e, s = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    assert torch.equal(model.inject(s, e), e + s)
    x = torch.randint(0, 512, (2, 16))
    assert model(x, targets=x).isfinite()


@pytest.mark.parametrize("mode", ["embed", "zeros", "noise"])
def test_state_init_modes(mode):
    model = GPT(GPTConfig.from_preset("tiny", state_init=mode))
    e = torch.randn(3, 7, 32)
    s0 = model.initial_state(e)
    assert s0.shape == e.shape and not s0.requires_grad
    if mode == "embed":
        assert torch.equal(s0, e)
    elif mode == "zeros":
        assert not s0.any()
    else:
        std = (2 / 5) ** 0.5
        assert s0.abs().max() <= 3 * std + 1e-6 and abs(s0.std().item() - std) < 0.15


# --- truncated BPTT ---------------------------------------------------------------------------------------------------
def reference_truncated_grads(model: GPT, x: torch.Tensor, r: int, k: int) -> dict[str, torch.Tensor]:
    """Hand-written truncated BPTT: the first r-k recurrences under no_grad, the rest differentiated."""
    model.zero_grad()
    T = x.size(1)
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    h = torch.nn.functional.rms_norm(model.wte(x), (32,))
    for block in model.prelude:
        h = block(h, cos, sin)
    e = h
    s = e.detach().clone()
    with torch.no_grad():
        for _ in range(r - k):
            s = model.recur_step(s, e, cos, sin)
    for _ in range(k):
        s = model.recur_step(s, e, cos, sin)
    for block in model.coda:
        s = block(s, cos, sin)
    loss = torch.nn.functional.cross_entropy(model.head(s).flatten(0, 1), x.flatten())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_truncated_bptt_matches_reference():
    cfg = GPTConfig.from_preset("tiny", recurrence=dict(bptt_k=2, r_max=8))
    model = randomized(cfg, std=0.1).train()
    x = torch.randint(0, 512, (2, 16))
    ref = reference_truncated_grads(model, x, r=6, k=2)
    model.zero_grad()
    model(x, targets=x, num_recur=6).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)
    # and the truncation is real: full backprop through all 6 recurrences gives different recurrent-block grads
    full = copy.deepcopy(model)
    full.config = GPTConfig.from_preset("tiny", recurrence=dict(bptt_k=8, r_max=8))
    full.zero_grad()
    full(x, targets=x, num_recur=6).backward()
    name = "recur.0.attn.c_q.weight"
    assert not torch.allclose(dict(full.named_parameters())[name].grad, ref[name])


# --- compile ----------------------------------------------------------------------------------------------------------
def test_compiled_recurrence_builds_at_most_two_graphs_and_matches_eager():
    cfg = GPTConfig.from_preset("tiny", recurrence=dict(r_max=16))
    model = randomized(cfg, std=0.1)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        eager = {r: model(x, num_recur=r) for r in range(1, 17)}
    torch._dynamo.reset()
    counters.clear()
    model.compile_recurrence(backend="aot_eager")
    model.train()
    for r in range(1, 17):
        model(x, targets=x, num_recur=r).backward()
    model.eval()
    with torch.no_grad():
        for r in range(1, 17):
            torch.testing.assert_close(model(x, num_recur=r), eager[r], rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


# --- KV cache ---------------------------------------------------------------------------------------------------------
def decode_logits(model: GPT, x: torch.Tensor, r: int, prefill: int, strategy: str) -> torch.Tensor:
    """Logits at positions prefill-1..T-1 from a prefill of `prefill` tokens then one token at a time."""
    cache = KVCache(model.config, x.size(0), x.size(1), num_recur=r, strategy=strategy)
    settings = DecodeSettings(num_recur=r, kv_cache=strategy)
    out = [model.forward_cached(x[:, :prefill], cache, settings)[0]]
    for t in range(prefill, x.size(1)):
        out.append(model.forward_cached(x[:, t : t + 1], cache, settings)[0])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_exact_cache_decode_equals_full_forward(r):
    model = randomized(GPTConfig.from_preset("tiny", recurrence=dict(r_max=8)))
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(x, num_recur=r)
    cached = decode_logits(model, x, r, prefill=6, strategy="exact")
    torch.testing.assert_close(cached, full[:, 5:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("r", [1, 4])
def test_windowed_attention_cache_decode_equals_full_forward(r):
    model = randomized(GPTConfig.from_preset("tiny", recurrence=dict(r_max=8), attn_window=3, coda_window=5))
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(x, num_recur=r)
    torch.testing.assert_close(decode_logits(model, x, r, prefill=6, strategy="exact"), full[:, 5:], rtol=0, atol=1e-4)


def test_attention_window_bounds_what_a_token_sees_and_recurrences_reach_further():
    """With a window of w tokens, the state after r recurrences depends on the (w-1) * (P + R*r) tokens before it and
    no others: a change at position 0 reaches position p only once enough recurrences have passed."""
    w = 3
    model = randomized(GPTConfig.from_preset("tiny", recurrence=dict(r_max=8), attn_window=w)).double()
    cfg = model.config
    x = torch.randint(0, 512, (1, 40))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 512
    # float64 states (the logits are float32, too coarse for the far end of the reach): masked keys add exactly 0
    for (r, sx), (_, sy, _) in zip(((r, s) for r, s, _ in model.iterate(x, 5)), model.iterate(y, 5), strict=True):
        reach = (w - 1) * (cfg.n_prelude + cfg.n_recur * r)  # 6 at r=1, 22 at r=5
        changed = (sx != sy)[0].any(-1)
        assert changed[: reach + 1].all() and not changed[reach + 1:].any(), (r, changed.nonzero().max())
    full = randomized(GPTConfig.from_preset("tiny", recurrence=dict(r_max=8))).double()
    with torch.no_grad():
        assert (full(x, num_recur=1) != full(y, num_recur=1))[0, -1].any()  # no window: the last token sees all


def test_plain_gpt_cache_equals_full_forward():
    model = randomized(GPTConfig.from_preset("tiny", n_prelude=2, n_recur=0, n_coda=1))
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(x)
    torch.testing.assert_close(decode_logits(model, x, 1, 5, "exact"), full[:, 4:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("r, k", [(2, 2), (3, 4), (4, 4)])
def test_ring_cache_equals_exact_when_r_fits(r, k):
    model = randomized(GPTConfig.from_preset("tiny", recurrence=dict(r_max=8)))
    x = torch.randint(0, 512, (2, 16))
    exact = decode_logits(model, x, r, 4, "exact")
    torch.testing.assert_close(decode_logits(model, x, r, 4, f"ring:{k}"), exact, rtol=0, atol=1e-5)


def test_ring_and_final_differ_from_exact_beyond_their_size_and_save_memory():
    cfg = GPTConfig.from_preset("tiny", recurrence=dict(r_max=8))
    model = randomized(cfg)
    x = torch.randint(0, 512, (1, 16))
    exact = decode_logits(model, x, 4, 4, "exact")
    assert not torch.allclose(decode_logits(model, x, 4, 4, "final"), exact, atol=1e-3)
    assert not torch.allclose(decode_logits(model, x, 4, 4, "ring:2"), exact, atol=1e-3)
    mem = {s: KVCache(cfg, 1, 64, num_recur=4, strategy=s).nbytes() for s in ("exact", "ring:2", "final")}
    per_layer = mem["exact"] / (cfg.n_prelude + cfg.n_coda + 4 * cfg.n_recur)
    assert mem["final"] == per_layer * (cfg.n_prelude + cfg.n_coda + cfg.n_recur)
    assert mem["final"] < mem["ring:2"] < mem["exact"]


def test_batched_prefill_of_different_lengths_matches_single_rows():
    model = randomized(GPTConfig.from_preset("tiny"))
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 5))
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0], padded[1, :5] = a[0], b[0]
    cache = KVCache(model.config, 2, 16, num_recur=2)
    logits, used, _ = model.forward_cached(padded, cache, R2, lengths=torch.tensor([9, 5]))
    assert cache.pos.tolist() == [9, 5] and used.tolist() == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(logits[0], model(a, num_recur=2)[0, -1], rtol=0, atol=1e-4)
        torch.testing.assert_close(logits[1], model(b, num_recur=2)[0, -1], rtol=0, atol=1e-4)
    # next decode step: each row continues at its own position
    nxt = torch.randint(0, 512, (2, 1))
    logits, _, _ = model.forward_cached(nxt, cache, R2)
    with torch.no_grad():
        torch.testing.assert_close(logits[1], model(torch.cat([b, nxt[1:]], 1), num_recur=2)[0, -1], atol=1e-4, rtol=0)


R2 = DecodeSettings(num_recur=2)


def test_warm_start_replaces_s0_by_the_given_state():
    """init_state is exactly s0: passing what state_init would give changes nothing; another state changes logits."""
    model = randomized(GPTConfig.from_preset("tiny", state_init="zeros"))
    x, nxt = torch.randint(0, 512, (1, 8)), torch.randint(0, 512, (1, 1))
    caches = [KVCache(model.config, 1, 16, num_recur=2) for _ in range(3)]
    for c in caches:
        _, _, state = model.forward_cached(x, c, R2)
    assert state.shape == (1, 32)
    cold, _, cold_state = model.forward_cached(nxt, caches[0], R2)
    zero_warm, _, zero_state = model.forward_cached(nxt, caches[1], R2, init_state=torch.zeros(1, 32))
    warm, _, _ = model.forward_cached(nxt, caches[2], R2, init_state=state)
    assert torch.equal(cold, zero_warm) and torch.equal(cold_state, zero_state)
    assert (cold - warm).abs().max() > 1e-3  # the previous final state flowed into this token's recurrence


# --- adaptive exit ----------------------------------------------------------------------------------------------------
def fixed_point_model() -> GPT:
    """Identity recurrent block and the adapter at its init (output e): s1 = s2 = ... = e, a fixed point at step 2."""
    cfg = GPTConfig.from_preset("tiny", state_init="zeros", recurrence=dict(r_max=8))
    model = randomized(cfg)
    with torch.no_grad():
        for block in model.recur:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.adapter.weight.zero_()
        model.adapter.weight[:, :32].copy_(torch.eye(32))
    return model


def exit_at(r: int, rule: str) -> DecodeSettings:
    return DecodeSettings(num_recur=r, exit=ExitRule.parse(rule))


def test_adaptive_exit_latent_exits_early_on_a_fixed_point_and_not_otherwise():
    model = fixed_point_model()
    cfg = model.config
    x = torch.randint(0, 512, (2, 6))
    cache = KVCache(cfg, 2, 16, num_recur=8)
    model.forward_cached(x[:, :5], cache, DecodeSettings(num_recur=8))
    _, used, _ = model.forward_cached(x[:, 5:], cache, exit_at(8, "latent:1e-4"))
    assert used.tolist() == [2, 2]
    # a random block keeps moving the state: no exit before the cap
    model = randomized(cfg, seed=3, std=0.3)
    _, used, _ = model.forward_cached(x[:, 5:], KVCache(cfg, 2, 16, num_recur=8), exit_at(8, "kl:1e-9"))
    assert used.tolist() == [8, 8]
    cache = KVCache(cfg, 2, 16, num_recur=8)
    model.forward_cached(x[:, :5], cache, DecodeSettings(num_recur=8))
    _, used, _ = model.forward_cached(x[:, 5:], cache, exit_at(8, "latent:1e-6"))
    assert used.tolist() == [8, 8]


def test_adaptive_exit_kl_respects_min_and_fills_cache_with_deepest_entry():
    model = fixed_point_model()
    cfg = model.config
    x = torch.randint(0, 512, (1, 6))
    cache = KVCache(cfg, 1, 16, num_recur=8)
    model.forward_cached(x[:, :5], cache, DecodeSettings(num_recur=8))
    _, used, _ = model.forward_cached(x[:, 5:], cache, exit_at(8, "kl:1e-6:4"))
    assert used.tolist() == [4]  # converged at 2, held to min_recur=4
    pool = cache.pool
    deepest = cache.key(pool.recur_layer(0, 3), 0, 5)
    # the exact cache fills the slots above lazily: by the time a later token's recurrences read them
    model.forward_cached(torch.randint(0, 512, (1, 1)), cache, DecodeSettings(num_recur=8))
    for slot in range(4, 8):
        assert torch.equal(cache.key(pool.recur_layer(0, slot), 0, 5), deepest)


def test_prompt_runs_the_full_budget_whatever_the_exit_rule():
    """A one-token prompt is a prefill: it never exits early (it used to, via the checkpoint's exit criterion)."""
    model = fixed_point_model()
    _, used, _ = model.forward_cached(torch.tensor([[5]]), KVCache(model.config, 1, 8, num_recur=4),
                                      exit_at(4, "latent:1e-4"), prompt=True)
    assert used.tolist() == [4]


def test_exact_cache_refuses_more_recurrences_than_slots():
    model = randomized(GPTConfig.from_preset("tiny"))
    cache = KVCache(model.config, 1, 8, num_recur=2)
    with pytest.raises(ValueError, match="sized for 2 recurrences"):
        model.forward_cached(torch.zeros(1, 2, dtype=torch.long), cache, DecodeSettings(num_recur=3))
