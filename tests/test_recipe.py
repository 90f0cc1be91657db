"""The depth recipe's training levers: deep supervision and the learned exit gate (its decode: test_batching.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recursive_model import GPT, GPTConfig
from recursive_model.recurrence import RecurrenceSampling


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=32, sequence_len=16, n_embd=16, n_head=2, n_kv_head=2, n_prelude=1, n_recur=1, n_coda=1,
                recurrence=RecurrenceSampling(mean=3, r_max=8, bptt_k=4, supervise=1))
    return GPTConfig(**{**base, **kw})


def randomized(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (3, 10), generator=g)
    y = torch.randint(0, 32, (3, 10), generator=g)
    y[0, :4] = -1  # ignored targets
    return x, y


def test_deep_supervision_is_the_mean_loss_of_the_last_recurrences():
    model = randomized(tiny())
    x, y = data()
    r, n = 6, 3
    deep = model(x, targets=y, num_recur=r, bptt_k=4, supervise=n)
    with torch.no_grad():  # the state after recurrence j does not depend on later ones: r = j replays it
        singles = [model(x, targets=y, num_recur=j) for j in range(r - n + 1, r + 1)]
    torch.testing.assert_close(deep, torch.stack(singles).mean(), rtol=1e-12, atol=1e-12)
    # supervise=1 is the plain last-recurrence loss
    torch.testing.assert_close(model(x, targets=y, num_recur=r, supervise=1), singles[-1], rtol=1e-12, atol=1e-12)
    # and gradients flow into every supervised recurrence's coda use: the coda's gradient differs from supervise=1
    model.zero_grad()
    deep.backward()
    g_deep = model.coda[0].mlp.c_fc.weight.grad.clone()
    model.zero_grad()
    model(x, targets=y, num_recur=r, supervise=1).backward()
    assert not torch.allclose(g_deep, model.coda[0].mlp.c_fc.weight.grad)


def test_supervise_is_validated_against_bptt_k():
    with pytest.raises(ValueError, match=r"RecurrenceSampling.supervise=5 .*\[1, bptt_k=4\]"):
        RecurrenceSampling(bptt_k=4, supervise=5)
    with pytest.raises(ValueError, match=r"gate_entropy=-1"):
        RecurrenceSampling(gate_entropy=-1)


def test_gate_loss_matches_its_definition_and_leaves_the_lm_gradient_alone():
    cfg = tiny(exit_gate=True)
    model = randomized(cfg)
    x, y = data()
    r, n, beta = 5, 3, 0.1
    total = model(x, targets=y, num_recur=r, supervise=n, gate_entropy=beta)
    # By hand: states after recurrences r-2, r-1, r; hazards of the first two; the last step takes the rest.
    with torch.no_grad():
        flat = y.reshape(-1)
        valid = flat != -1
        losses, hazards = [], []
        steps = {j: (state, logits) for j, state, logits in model.iterate(x, r)}
        for j in range(r - n + 1, r + 1):
            s, logits = steps[j]
            torch.testing.assert_close(logits, model(x, num_recur=j), rtol=0, atol=0)  # iterate = forward at each r
            losses.append(F.cross_entropy(logits.view(-1, 32), flat, ignore_index=-1, reduction="none"))
            hazards.append(torch.sigmoid(model.exit_gate(F.rms_norm(s, (s.size(-1),))).squeeze(-1)).reshape(-1))
        p0 = hazards[0]
        p1 = (1 - hazards[0]) * hazards[1]
        p2 = (1 - hazards[0]) * (1 - hazards[1])
        p = torch.stack([p0, p1, p2])
        L = torch.stack(losses)
        gate = (p * L).sum(0) + beta * (p * p.log()).sum(0)
        want = (L.mean(0)[valid].sum() + gate[valid].sum()) / valid.sum()
    torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-8)  # the entropy clamps p at 1e-9
    # The gate term moves only the gate: every other gradient equals the deep-supervision loss's.
    total.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads["exit_gate.weight"].abs().sum() > 0
    plain = randomized(tiny())
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("exit_gate")})
    plain(x, targets=y, num_recur=r, supervise=n).backward()
    for k, p in plain.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-9, atol=1e-12)


def test_pipeline_stage_sets_the_recipe_fields():
    from pipelines.config import PipelineConfig
    from recursive_model.yaml_config import ConfigError

    cfg = PipelineConfig.from_preset("tiny", model={"preset": "tiny", "exit_gate": True},
                                     stages=[dict(name="pretrain", recurrence={"supervise": 2, "gate_entropy": 0.1})])
    rec = cfg.stages[0].recurrence
    assert (rec.supervise, rec.gate_entropy, rec.bptt_k) == (2, 0.1, cfg.gpt_config().recurrence.bptt_k)
    assert cfg.gpt_config().exit_gate is True
    with pytest.raises(ConfigError, match=r"stages\[0\]\.recurrence: RecurrenceSampling\.supervise=9"):
        PipelineConfig.from_preset("tiny", stages=[dict(name="pretrain", recurrence={"supervise": 9})])
