"""Engine (batched, streamed generation with recurrence accounting and the calculator tool), checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from recursive_model import (
    GPT,
    CheckpointError,
    Engine,
    GPTConfig,
    Tokenizer,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from recursive_model.calculator import CalculatorError, calculate

TEXT = ["the recurrent block is applied r times to the state.", "hello world 12 + 34 = 46", "ab" * 50] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(TEXT), vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, sequence_len=64, train_recur_max=8))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def greedy_reference(model: GPT, prompt: list[int], n: int, r: int) -> list[int]:
    """Greedy continuation by recomputing the full forward for every token (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), num_recur=r)[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_cached_generation_equals_recompute_for_a_batch_of_different_lengths(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode("hello world", prepend="<|bos|>"), tokenizer.encode("the", prepend="<|bos|>"),
               tokenizer.encode("ab ab ab ab ab ab", prepend="<|bos|>")]
    assert len({len(p) for p in prompts}) == 3
    steps = list(engine.generate(prompts, max_tokens=8, temperature=0.0, num_recur=3))
    for b, prompt in enumerate(prompts):
        got = [s[b].token for s in steps if s[b] is not None]
        want = greedy_reference(model, prompt, len(got), r=3)
        stop = next((i for i, t in enumerate(want) if t in engine.stop_ids), len(want))
        assert got[: stop + 1] == want[: stop + 1]
        assert all(s[b].num_recur == 3 for s in steps if s[b] is not None)


def test_sampling_is_reproducible_by_seed_and_top_k_restricts(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    a = engine.generate_batch([prompt], max_tokens=10, temperature=1.0, top_k=5, seed=3)[0]
    b = engine.generate_batch([prompt], max_tokens=10, temperature=1.0, top_k=5, seed=3)[0]
    assert a.tokens == b.tokens and len(a.recurs) == len(a.tokens)
    top1 = engine.generate_batch([prompt], max_tokens=6, temperature=1.0, top_k=1, seed=9)[0]
    greedy = engine.generate_batch([prompt], max_tokens=6, temperature=0.0)[0]
    assert top1.tokens == greedy.tokens


def test_adaptive_exit_reports_recurrences_within_bounds(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello world", prepend="<|bos|>")
    fixed = engine.generate_batch([prompt], max_tokens=12, temperature=0.0, num_recur=6)[0]
    adaptive = engine.generate_batch([prompt], max_tokens=12, temperature=0.0, num_recur=6, exit_criterion="latent",
                                     exit_threshold=10.0)[0]  # huge threshold: exit as soon as allowed
    assert set(fixed.recurs) == {6}
    assert adaptive.recurs[0] == 6  # the prompt pass runs at full r
    assert all(r == 1 for r in adaptive.recurs[1:])
    assert adaptive.mean_recur < fixed.mean_recur


@pytest.mark.parametrize("strategy", ["exact", "ring:2", "final"])
def test_kv_strategy_and_warm_start_per_call(model, tokenizer, strategy):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    for warm in (False, True):
        res = engine.generate_batch([prompt], max_tokens=5, temperature=0.0, num_recur=3, kv_cache=strategy,
                                    warm_start=warm)[0]
        assert 1 <= len(res.tokens) <= 5


def test_exact_and_ring_agree_when_ring_is_large_enough(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello world", prepend="<|bos|>")
    a = engine.generate_batch([prompt], max_tokens=8, temperature=0.0, num_recur=3, kv_cache="exact")[0]
    b = engine.generate_batch([prompt], max_tokens=8, temperature=0.0, num_recur=3, kv_cache="ring:3")[0]
    assert a.tokens == b.tokens


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token script through forward_cached, so tool handling can be tested deterministically."""

    def __init__(self, config: GPTConfig, script: list[int]):
        super().__init__()
        self.config = config
        self.script = script
        self.calls = 0
        self.fed: list[int] = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward_cached(self, idx, cache, num_recur=None, lengths=None, init_state=None, **_):
        B, T = idx.shape
        if T == 1:
            self.fed.append(int(idx[0, 0]))
        cache.advance(lengths if lengths is not None else torch.full((B,), T))
        logits = torch.full((B, self.config.vocab_size), -1e9)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 0
        self.calls += 1
        return logits, torch.full((B,), 2), torch.zeros(B, self.config.n_embd)


def test_calculator_tool_output_is_forced_into_the_stream(tokenizer):
    tok = tokenizer.encode_special
    expr = tokenizer.encode("12*34")
    script = [tok("<|python_start|>"), *expr, tok("<|python_end|>")]
    cfg = GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    # after the python block the scripted model would emit assistant_end (stop); the engine must first force the output
    model = ScriptedModel(cfg, script + [tok("<|assistant_end|>")] * 20)
    engine = Engine(model, tokenizer)
    steps = list(engine.generate([[tok("<|bos|>")]], max_tokens=30, temperature=0.0))
    tokens = [s[0].token for s in steps if s[0] is not None]
    forced = [s[0].forced for s in steps if s[0] is not None]
    out = [tok("<|output_start|>"), *tokenizer.encode("408"), tok("<|output_end|>")]
    i = len(script)
    assert tokens[:i] == script and tokens[i:i + len(out)] == out and all(forced[i:i + len(out)])
    assert tokens[-1] == tok("<|assistant_end|>")
    assert model.fed[1:len(tokens)] == tokens[:-1]  # after the 1-token prompt, every emitted token is fed back


@pytest.mark.parametrize("expr, value", [("12*34", "408"), ("1,234 + 1", "1235"), ("7/2", "3.5"), ("2**10", "1024"),
                                         ("-(3 - 5)", "2"), ("'strawberry'.count('r')", "3"), ("10 // 3", "3")])
def test_calculator_evaluates_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "open('/etc/passwd')", "x + 1", "2**100000",
                                  "[1] * 10", "lambda: 1", "1/0", "'a' * 10**9", "().__class__", ""])
def test_calculator_refuses_everything_else(expr):
    with pytest.raises(CalculatorError):
        calculate(expr)


def test_engine_rejects_bad_requests(model, tokenizer):
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError, match="max_tokens"):
        next(engine.generate([[1, 2]], max_tokens=0))
    with pytest.raises(ValueError, match="at least one token"):
        next(engine.generate([[]], max_tokens=3))
    with pytest.raises(ValueError, match="no room"):
        next(engine.generate([[1] * 64], max_tokens=3))


# --- checkpoints ------------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_with_optimizer_state(model, tokenizer, tmp_path):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, tokenizer.vocab_size, (2, 16))
    model.train()
    model(x, targets=x).backward()
    opt.step()
    model.eval()
    d = save_checkpoint(tmp_path / "ck", model, model.config, tokenizer, {"stage": "sft", "step": 7},
                        optimizer_state={"optimizers": [opt.state_dict()]})
    names = sorted(p.name for p in d.iterdir())
    assert names == ["config.json", "manifest.json", "meta.json", "model.safetensors", "optimizer.pt", "tokenizer"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "meta.json", "optimizer.pt",
                                      "tokenizer/tokenizer.json"}
    loaded = load_checkpoint(d, load_optimizer=True)
    assert loaded.config == model.config and loaded.meta["step"] == 7
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert loaded.tokenizer.encode("hello world") == tokenizer.encode("hello world")
    restored = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    restored.load_state_dict(loaded.optimizer_state["optimizers"][0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_checkpoint_verification_names_the_bad_file(model, tokenizer, tmp_path):
    d = save_checkpoint(tmp_path / "ck", model, model.config, tokenizer, {"step": 1})
    weights = d / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 mismatch"):
        load_checkpoint(d)
    weights.write_bytes(original)
    verify_checkpoint(d)
    (d / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: listed in the manifest but missing"):
        verify_checkpoint(d)
    (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json missing"):
        load_checkpoint(d)


def test_optimizer_file_is_not_unpickled(model, tokenizer, tmp_path):
    """A pickle payload in optimizer.pt is refused by weights_only loading (and the manifest would catch edits)."""
    d = save_checkpoint(tmp_path / "ck", model, model.config, None, {"step": 1}, optimizer_state={"ok": 1})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "optimizer.pt")
    with pytest.raises(Exception):  # noqa: B017 - either the manifest or weights_only refuses it
        load_checkpoint(d, load_optimizer=True)
    with pytest.raises(Exception):  # noqa: B017
        load_checkpoint(d, load_optimizer=True, verify=False)
