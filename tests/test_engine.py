"""Engine (batched, streamed generation with recurrence accounting and the calculator tool)."""

from __future__ import annotations

import pytest
import torch

from recursive_model import GPT, Engine, GPTConfig, Tokenizer
from recursive_model.calculator import CalculatorError, calculate
from recursive_model.kv_cache import KVCache
from recursive_model.model import Flight
from recursive_model.recurrence import DecodeSettings

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
    adaptive = engine.generate_batch([prompt], max_tokens=12, temperature=0.0, num_recur=6,
                                     exit="latent:10")[0]  # huge threshold: exit as soon as allowed
    assert set(fixed.recurs) == {6}
    # the first token too: the last prompt token is decoded with the exit rule (the rest of the prompt runs full r)
    assert all(r == 1 for r in adaptive.recurs)
    assert adaptive.mean_recur < fixed.mean_recur


def manual_greedy(model: GPT, prompt: list[int], n: int, settings: DecodeSettings) -> tuple[list[int], list[int]]:
    """Greedy decode written out with KVCache + forward_cached, warm start passed by hand: the Engine's reference.

    The prompt but its last token is prefilled at the full budget; the last prompt token is decoded like a generated
    one (exit rule, ring slots as in decoding) but from a prompt token's s0 (no warm start)."""
    cache = KVCache(model.config, 1, len(prompt) + n, num_recur=settings.num_recur, strategy=settings.kv_cache)
    if len(prompt) > 1:
        model.forward_cached(torch.tensor([prompt[:-1]]), cache, settings, prompt=True)
    logits, used, state = model.forward_cached(torch.tensor([prompt[-1:]]), cache, settings, prompt=False)
    tokens, recurs = [], []
    for _ in range(n):
        tokens.append(int(logits[0].argmax()))
        recurs.append(int(used[0]))
        logits, used, state = model.forward_cached(torch.tensor([[tokens[-1]]]), cache, settings,
                                                   init_state=state if settings.warm_start else None)
    return tokens, recurs


@pytest.mark.parametrize("strategy", ["exact", "ring:2", "final"])
@pytest.mark.parametrize("warm", [False, True])
def test_kv_strategy_and_warm_start_per_call_equal_the_hand_written_decode(model, tokenizer, strategy, warm):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    settings = DecodeSettings(num_recur=3, kv_cache=strategy, warm_start=warm)
    res = list(engine.generate([prompt], max_tokens=6, temperature=0.0, num_recur=3, kv_cache=strategy,
                               warm_start=warm))
    got = [(s[0].token, s[0].num_recur) for s in res if s[0] is not None]
    tokens, recurs = manual_greedy(model, prompt, len(got), settings)
    assert got == list(zip(tokens, recurs, strict=True))


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token script through the engine's begin/recur/finish phases, so tool handling is deterministic."""

    def __init__(self, config: GPTConfig, script: list[int]):
        super().__init__()
        self.config = config
        self.script = script
        self.calls = 0
        self.fed: list[int] = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def begin_rows(self, idx, kv, settings, **_):
        B, T = idx.shape
        if T == 1:
            self.fed.append(int(idx[0, 0]))
        x = torch.zeros(B, T, self.config.n_embd)
        two = torch.full((B,), 2)
        return Flight(x, x, two, two.clone(), [None] * B)  # every row has run its (scripted) 2 recurrences

    def fixed_budget(self, settings):
        return None  # always the phases below

    def recur_rows(self, flight, kv, max_steps=None):
        pass

    def finish_rows(self, flight, kv, lengths=None):
        B = flight.s.size(0)
        logits = torch.full((B, self.config.vocab_size), -1e9)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 0
        self.calls += 1
        return logits, torch.zeros(B, self.config.n_embd)


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
