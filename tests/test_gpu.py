"""The GPU path: bf16 autocast training, cached decode, compiled recurrence, generation and checkpoints on CUDA.

Every test is collected on every machine. CUDA cases carry the `gpu` marker and skip without a CUDA device, so
`pytest -m gpu tests/test_gpu.py` on a GPU box runs exactly them. Tests whose code path exists on CPU too are
parametrized over devices: CI runs the same test code on CPU, a GPU box adds the CUDA case. These tests need no
conftest fixture, so a box with only torch, tiktoken, safetensors, numpy and pytest runs them with `--noconftest`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from benchmarks._common import randomize_
from checkpoints import load_checkpoint, save_checkpoint
from recursive_model import GPT, Engine, GPTConfig, Tokenizer
from recursive_model.kv_cache import KVCache
from recursive_model.optim import OptimizerSettings, build_optimizers
from recursive_model.recurrence import DecodeSettings

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda], id="cuda")
DEVICES = ["cpu", CUDA]

# bf16 keeps 8 significant bits. On the tiny model one training step's loss differs from float32 by <= 0.3% (CPU,
# AdamW and Muon, 4 steps); 1% leaves room for other kernels while staying far below what training moves the loss
# (~2.4 nats over those steps, checked in the test).
BF16_LOSS_RTOL = 1e-2
# float32 vs float64 logits of the random tiny model differ by <= 3e-5 at r = 1..16 (no chaotic growth with r), so
# two float32 computations that merely order their sums differently (CUDA vs CPU kernels, inductor fusion) stay well
# inside this.
FP32_ATOL = 2e-4
# Largest r at which each strategy still gives every recurrence its own slot: there decode equals the full forward.
EXACT_UP_TO = {"exact": 4, "ring:2": 2, "final": 1}


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """float32 comparisons need float32 matmuls; TF32 (10 mantissa bits) would be allowed by precision 'high'."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def byte_tokenizer() -> Tokenizer:
    """The 256 byte tokens and the special tokens, no merges: nothing to train, nothing to read."""
    return Tokenizer({bytes([b]): b for b in range(256)})


def random_model(device: str, seed: int = 0, std: float = 0.1, **overrides) -> GPT:
    """The tiny preset with every weight random (the default init makes each block the identity, which hides bugs);
    the same weights on every device, drawn on CPU."""
    cfg = GPTConfig.from_preset("tiny", **overrides)
    return randomize_(GPT(cfg), seed=seed, std=std).to(device).eval()


def tokens(shape: tuple[int, ...], high: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- bf16 training step
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_training_steps_track_float32(device, optimizer):
    """Four steps of the pipeline's step (autocast forward, backward, clip, optimizer) in bf16 and in float32 from
    the same weights: every step's loss, and the float32 loss of the trained weights, agree within BF16_LOSS_RTOL."""
    base = random_model("cpu")
    x = tokens((4, 33), high=base.config.vocab_size)
    inp, tgt = x[:, :-1].to(device), x[:, 1:].to(device)
    settings = OptimizerSettings(optimizer=optimizer, lr=1e-2, embedding_lr=3e-2, head_lr=1e-2, warmup_steps=0)
    losses, head_dtypes = {}, {}
    for name, autocast in (
        ("fp32", torch.autocast(device, enabled=False)),
        ("bf16", torch.autocast(device, dtype=torch.bfloat16)),
    ):
        model = copy.deepcopy(base).to(device).train()
        optimizers = build_optimizers(model, settings)
        seen: list[torch.dtype] = []
        hook = model.lm_head.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out.dtype))
        per_step = []
        for _ in range(4):
            with autocast:
                loss = model(inp, targets=tgt, num_recur=3)  # r=3 > bptt_k=2: frozen and differentiated recurrences
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            per_step.append(loss.item())
        hook.remove()
        with torch.no_grad():
            per_step.append(model(inp, targets=tgt, num_recur=3).item())  # float32 loss of the trained weights
        losses[name], head_dtypes[name] = per_step, set(seen)
    assert head_dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}  # the bf16 run really ran in bf16
    assert losses["bf16"] != losses["fp32"]
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"], strict=True):
        assert abs(bf16 - fp32) <= BF16_LOSS_RTOL * abs(fp32), (losses, device, optimizer)
    assert losses["fp32"][0] - losses["fp32"][-1] > 10 * BF16_LOSS_RTOL * losses["fp32"][0]  # training moved it


# ---------------------------------------------------------------------------------------------- cached decode
def cached_logits(model: GPT, x: torch.Tensor, r: int, strategy: str, prefill: int = 4) -> torch.Tensor:
    """(B, T - prefill + 1, V): logits of a prefill of `prefill` tokens, then of one token at a time, on x's device."""
    cache = KVCache(model.config, x.size(0), x.size(1), num_recur=r, strategy=strategy, device=x.device)
    settings = DecodeSettings(num_recur=r, kv_cache=strategy)
    steps = [x[:, :prefill]] + [x[:, t : t + 1] for t in range(prefill, x.size(1))]
    return torch.stack([model.forward_cached(chunk, cache, settings)[0] for chunk in steps], dim=1)


@pytest.mark.parametrize("strategy", sorted(EXACT_UP_TO))
@pytest.mark.parametrize("device", DEVICES)
def test_cached_decode_equals_full_forward(device, strategy):
    r = EXACT_UP_TO[strategy]
    model = random_model(device, recurrence=dict(r_max=8))
    x = tokens((2, 16), high=model.config.vocab_size).to(device)
    with torch.no_grad():
        full = model(x, num_recur=r)
    torch.testing.assert_close(cached_logits(model, x, r, strategy), full[:, 3:], rtol=0, atol=FP32_ATOL)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("strategy", sorted(EXACT_UP_TO))
def test_cached_decode_on_cuda_equals_cpu_beyond_the_ring(strategy):
    """At r=4 ring:2 and final drop recurrences (decode != full forward by design); CUDA must drop the same ones."""
    model = random_model("cpu", recurrence=dict(r_max=8))
    x = tokens((2, 16), high=model.config.vocab_size)
    on_cpu = cached_logits(model, x, 4, strategy)
    on_cuda = cached_logits(copy.deepcopy(model).cuda(), x.cuda(), 4, strategy)
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=FP32_ATOL)


# ------------------------------------------------------------------------------------------- compiled recurrence
def compiled_graphs_over_r(model: GPT, x: torch.Tensor, backend: str, autocast, rs: range) -> tuple[int, float]:
    """Train (forward + backward) then eval at every r of `rs` through `compile_recurrence`; (graphs built, the
    largest |compiled - eager| over the eval logits)."""
    with torch.no_grad(), autocast:
        eager = {r: model(x, num_recur=r) for r in rs}
    torch._dynamo.reset()
    counters.clear()
    try:
        model.compile_recurrence(backend=backend)
        model.train()
        for r in rs:
            with autocast:
                loss = model(x, targets=x, num_recur=r)
            loss.backward()
        model.eval()
        with torch.no_grad(), autocast:
            diff = max((model(x, num_recur=r) - eager[r]).abs().max().item() for r in rs)
        return int(counters["stats"]["unique_graphs"]), diff
    finally:
        torch._dynamo.reset()


# CPU runs r = 1..4, which already covers both grad modes (frozen recurrences start at r > bptt_k = 2) and keeps CI
# short; tests/test_model.py sweeps r = 1..16 on CPU. CUDA sweeps r = 1..16 with the inductor backend used in training.
COMPILE_CASES = [
    pytest.param("cpu", "aot_eager", range(1, 5), id="cpu-aot_eager"),
    pytest.param("cuda", "inductor", range(1, 17), marks=[pytest.mark.gpu, requires_cuda], id="cuda-inductor"),
]


@pytest.mark.parametrize("device, backend, rs", COMPILE_CASES)
def test_compiled_recurrence_builds_at_most_two_graphs_and_matches_eager(device, backend, rs):
    model = random_model(device, recurrence=dict(r_max=16))
    x = tokens((2, 16), high=model.config.vocab_size).to(device)
    graphs, diff = compiled_graphs_over_r(model, x, backend, torch.autocast(device, enabled=False), rs)
    assert graphs <= 2
    assert diff <= FP32_ATOL


@pytest.mark.parametrize("device, backend, rs", COMPILE_CASES)
def test_compiled_recurrence_under_bf16_autocast_builds_at_most_two_graphs(device, backend, rs):
    model = random_model(device, recurrence=dict(r_max=16))
    x = tokens((2, 16), high=model.config.vocab_size).to(device)
    graphs, _ = compiled_graphs_over_r(model, x, backend, torch.autocast(device, dtype=torch.bfloat16), rs)
    assert graphs <= 2


# ------------------------------------------------------------------------------------------------------ engine
def greedy_by_recompute(model: GPT, prompt: list[int], n: int, r: int) -> list[int]:
    """n greedy tokens by a full forward over the whole sequence for each one (no cache), on the model's device."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids, num_recur=r)[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_engine_generates_on_device_as_recompute_does(device):
    tokenizer = byte_tokenizer()
    model = random_model(device, vocab_size=tokenizer.vocab_size, recurrence=dict(r_max=8))
    engine = Engine(model, tokenizer)
    assert engine.device.type == device
    prompts = [tokens((5,), seed=2).tolist(), tokens((9,), seed=3).tolist()]
    steps = list(engine.generate(prompts, max_tokens=6, temperature=0.0, num_recur=3, kv_cache="exact"))
    for b, prompt in enumerate(prompts):
        got = [s[b] for s in steps if s[b] is not None]
        assert got and all(ts.num_recur == 3 for ts in got)
        want = greedy_by_recompute(model, prompt, len(got), r=3)
        stop = next((i for i, t in enumerate(want) if t in engine.stop_ids), len(want))
        assert [ts.token for ts in got][: stop + 1] == want[: stop + 1]


@pytest.mark.parametrize("device", DEVICES)
def test_engine_generates_with_bf16_weights(device):
    """Served weights are bf16 on a GPU: the KV cache takes the model's dtype and every strategy generates."""
    tokenizer = byte_tokenizer()
    model = random_model(device, vocab_size=tokenizer.vocab_size, recurrence=dict(r_max=8)).to(torch.bfloat16)
    engine = Engine(model, tokenizer)
    for strategy in EXACT_UP_TO:
        results = engine.generate_batch(
            [tokens((6,), seed=4).tolist()] * 2, max_tokens=4, temperature=0.0, num_recur=4, kv_cache=strategy
        )
        assert results[0].tokens == results[1].tokens  # same prompt, greedy: same tokens whatever the row
        assert results[0].tokens and all(r == 4 for r in results[0].recurs)
        assert all(0 <= t < tokenizer.vocab_size for t in results[0].tokens)


# ------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_saved_on_device_loads_on_cpu(device, tmp_path):
    """Weights and optimizer state written from `device` (CUDA tensors included) load onto a CPU-only process."""
    tokenizer = byte_tokenizer()
    model = random_model(device, vocab_size=tokenizer.vocab_size).train()
    optimizers = build_optimizers(model, OptimizerSettings(optimizer="muon", warmup_steps=0))
    x = tokens((2, 12), high=tokenizer.vocab_size).to(device)
    model(x, targets=x).backward()
    for opt in optimizers:
        opt.step()  # optimizer state now lives on `device`
    model.eval()
    state = {"optimizers": [opt.state_dict() for opt in optimizers]}
    save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer, {"step": 1}, optimizer_state=state)

    loaded = load_checkpoint(tmp_path / "ckpt", device="cpu", load_optimizer=True)
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    for name, p in model.named_parameters():
        assert torch.equal(dict(loaded.model.named_parameters())[name], p.detach().cpu()), name
    saved = [
        t
        for opt in optimizers
        for s in opt.state_dict()["state"].values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    restored = [
        t
        for opt in loaded.optimizer_state["optimizers"]
        for s in opt["state"].values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    assert len(restored) == len(saved) > 0
    assert all(t.device.type == "cpu" for t in restored)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(saved, restored, strict=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x.cpu()), model(x).cpu(), rtol=0, atol=FP32_ATOL)
    assert loaded.tokenizer.encode("abc") == tokenizer.encode("abc") and loaded.meta["step"] == 1
