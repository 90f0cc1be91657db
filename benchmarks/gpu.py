"""Training MFU, peak memory and decode throughput on one GPU: d20-recursive (r = 4 and Poisson r) vs d20.

Training: the pipeline's step (bf16 autocast, the optimizer of recursive_model.optim as the d20 pretrain stage builds
it, grad clipping, the LR schedule) on random tokens at the preset's full sequence length. The recursive model runs
`model.compile_recurrence()`; the blocks applied once (prelude, coda, and every block of d20) are compiled one block
at a time, so neither model is compared against an eager twin. The micro-batch is the largest that fits, found by
halving from `--start-batch` on CUDA out-of-memory (searched eagerly, so OOM attempts cost no compile); an optimizer
step accumulates micro-batches up to the d20 pretrain stage's 32 sequences (batch_size x grad_accum), so Muon's cost
is spread as in training. Variants:
  d20_recursive_r4    (P, R, C) = (2, 4, 2) at r = 4 (effective depth 20)
  d20_recursive_rpoi  the same model, r drawn per step as the pipeline draws it (recurrence.sample, recur_generator)
  d20                 the plain 20-layer GPT of the same width
MFU = flops_per_token (mean over the timed steps' r) x tokens/s / peak FLOP/s of the device, read from its name
(recursive_model.optim.PEAK_FLOPS). Decode: `Engine.generate`, greedy, bf16 weights on CUDA, batch 1 and 32, per KV
strategy. A phase that would start after `--budget-s` seconds is skipped and says so.

    python benchmarks/gpu.py            # one CUDA device; <= 8 minutes on an H100/H200
    python benchmarks/gpu.py --quick    # CPU, the d20 pair at toy width, seconds: structure only, no figures

Imports only recursive_model, benchmarks._common and the standard library, so it needs torch, tiktoken, safetensors
and numpy alone: no Ray, no pipelines (tests/test_benchmarks.py runs --quick with those imports blocked).
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import recursive_model
from benchmarks._common import emit, environment, parser, randomize_
from recursive_model import GPT, Engine, GPTConfig, Tokenizer, recur_generator
from recursive_model.optim import (
    OptimizerSettings,
    build_optimizers,
    device_peak_flops,
    lr_multiplier,
    set_lr_multiplier,
)
from recursive_model.tokenizer import SPECIAL_TOKENS

STRATEGIES = ("exact", "ring:2", "final")
DECODE_BATCHES = (1, 32)
# The d20 pretrain stage's optimizer (pipelines/config.py, preset d20 / d20-recursive); a test keeps them equal.
D20_PRETRAIN_OPTIMIZER = OptimizerSettings(
    optimizer="muon",
    lr=0.02,
    embedding_lr=0.2,
    head_lr=0.004,
    weight_decay=0.0,
    steps=21400,
    warmup_steps=0,
    warmdown_frac=0.2,
)
GRAD_CLIP = 1.0  # StageConfig.grad_clip default, which the d20 stages keep
# The d20 pretrain stage's sequences per optimizer step on one device (batch_size x grad_accum; a test keeps it equal)
D20_PRETRAIN_SEQUENCES = 32
SEED = 0


@dataclass(frozen=True)
class Sizes:
    """What a run measures at; `full` for a GPU, `quick` for a CPU smoke run."""

    recursive_preset: str
    baseline_preset: str
    overrides: dict  # GPTConfig overrides applied to both presets
    start_batch: int
    step_sequences: int  # sequences per optimizer step, accumulated from micro-batches of the largest batch that fits
    warmup_steps: int
    timed_steps: int
    prompt_tokens: int
    decode_tokens: int
    batching_requests: int  # requests in the continuous-batching trace
    compile_backend: str


FULL = Sizes(
    "d20-recursive",
    "d20",
    {},
    start_batch=D20_PRETRAIN_SEQUENCES,
    step_sequences=D20_PRETRAIN_SEQUENCES,
    warmup_steps=3,
    timed_steps=10,
    prompt_tokens=16,
    decode_tokens=128,
    batching_requests=64,
    compile_backend="inductor",
)
# the d20 pair's layer counts at a toy width, so the quick run walks the same code at toy cost
QUICK = dataclasses.replace(
    FULL,
    overrides=dict(vocab_size=512, sequence_len=64, n_embd=32, n_head=2, n_kv_head=2),
    start_batch=2,
    step_sequences=4,  # two micro-steps: the quick run walks the accumulation too
    warmup_steps=2,
    timed_steps=2,
    prompt_tokens=4,
    decode_tokens=4,
    batching_requests=8,
    compile_backend="aot_eager",
)


def log(message: str) -> None:
    """Progress to stderr (stdout holds only the JSON)."""
    sys.stderr.write(f"[gpu {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


class Budget:
    """Seconds since start vs a limit: a phase that would start past the limit is skipped, so the run stays short."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spent(self) -> bool:
        return self.elapsed() > self.seconds

    def skipped(self) -> dict[str, str]:
        return {"status": "skipped", "reason": f"time budget of {self.seconds:.0f} s spent"}


# ------------------------------------------------------------------------------------------------------ helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Release a finished model: dynamo's caches hold its compiled modules, and the compiled recurrence is a cycle."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def largest_batch(fits: Callable[[int], None], start: int) -> tuple[int, list[int]]:
    """Halve the batch from `start` until `fits(batch)` runs without CUDA out-of-memory; (batch, batches tried)."""
    batch, tried = start, []
    while batch >= 1:
        tried.append(batch)
        try:
            fits(batch)
            return batch, tried
        except torch.OutOfMemoryError:
            pass  # freed below: the exception's frames hold the step's tensors until the except block ends
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch //= 2
    raise RuntimeError(f"largest_batch: no batch fits, tried {tried}")


def byte_pair_tokenizer(vocab_size: int) -> Tokenizer:
    """A Tokenizer of exactly `vocab_size` ids without training (rustbpe) or files: the 256 bytes, then two-byte
    tokens in order, then the special tokens. Generation needs real special-token ids and decodable ids only."""
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if not 0 <= n_merges <= 256 * 256:
        raise ValueError(
            f"byte_pair_tokenizer: vocab_size={vocab_size} must lie in [{256 + len(SPECIAL_TOKENS)}, "
            f"{256 * 257 + len(SPECIAL_TOKENS)}]"
        )
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(n_merges):
        ranks[bytes([i // 256, i % 256])] = 256 + i
    return Tokenizer(ranks, name="byte-pairs")


def dynamo_counts() -> dict[str, int]:
    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def compile_model(model: GPT, backend: str) -> str:
    """Compile the recurrence once (r never recompiles) and every once-applied block on its own; say what was done."""
    done = []
    if model.config.is_recursive:
        model.compile_recurrence(backend=backend)
        done.append("recurrence (compile_recurrence)")
    for block in [*model.prelude, *model.coda]:
        block.compile(backend=backend)
    done.append(f"{len(model.prelude) + len(model.coda)} once-applied blocks, each on its own")
    return f"{backend}: " + " + ".join(done)


# ----------------------------------------------------------------------------------------------------- training
class TrainStep:
    """The pipeline's optimizer step (pipelines/train_loop.run_stage) on a fixed random batch: `grad_accum`
    micro-batches of `batch` sequences, each loss scaled by 1 / grad_accum, then clip and one optimizer step."""

    def __init__(self, model: GPT, settings: OptimizerSettings, device: torch.device):
        self.model, self.settings, self.device = model, settings, device
        self.optimizers = build_optimizers(model, settings)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        self.step_index, self.x, self.y, self.grad_accum = 0, None, None, 1
        self.last_loss = torch.zeros((), device=device)

    def set_batch(self, batch: int, grad_accum: int = 1) -> None:
        cfg = self.model.config
        self.x = self.y = None
        g = torch.Generator(device="cpu").manual_seed(SEED)
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.sequence_len + 1), generator=g)
        self.x, self.y, self.grad_accum = x[:, :-1].to(self.device), x[:, 1:].to(self.device), grad_accum

    def __call__(self, r: int | None) -> None:
        set_lr_multiplier(self.optimizers, lr_multiplier(self.step_index, self.settings))
        try:
            for _ in range(self.grad_accum):
                with self.autocast:
                    loss = self.model(self.x, targets=self.y, num_recur=r)
                (loss / self.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            for opt in self.optimizers:
                opt.step()
        finally:
            self.model.zero_grad(set_to_none=True)  # an OOM mid-step must not leave gradients behind
        self.last_loss = loss.detach()  # no .item(): a host sync per step would hide the GPU's speed
        self.step_index += 1


def time_steps(step: TrainStep, rs: list[int | None], model: GPT, peak: float | None) -> dict[str, Any]:
    """Run one step per entry of `rs` and report tokens/s, FLOPs, MFU and peak memory of those steps."""
    device = step.device
    reset_peak_memory(device)
    synchronize(device)
    t0 = time.perf_counter()
    for r in rs:
        step(r)
    synchronize(device)
    seconds = time.perf_counter() - t0
    batch, seq = step.x.shape
    tok_s = batch * seq * step.grad_accum * len(rs) / seconds
    flops = sum(model.flops_per_token(r) for r in rs) / len(rs)
    mem = peak_memory(device)
    loss = float(step.last_loss)
    return {
        "batch": batch,
        "seq": seq,
        "grad_accum": step.grad_accum,
        "tokens_per_step": batch * seq * step.grad_accum,
        "timed_steps": len(rs),
        "r_timed_steps": list(rs) if model.config.is_recursive else None,
        "seconds": seconds,
        "tokens_per_s": tok_s,
        "flops_per_token": flops,
        "model_flops_per_s": flops * tok_s,
        "mfu": flops * tok_s / peak if peak else None,
        "peak_memory_bytes": mem,
        "peak_memory_gib": mem / 2**30 if mem is not None else None,
        "loss_last_step": loss,
        "loss_finite": loss == loss and abs(loss) != float("inf"),
    }


def train_variants(
    preset: str, rs_of: dict[str, Callable[[int], int | None]], sizes: Sizes, device: torch.device, peak: float | None
) -> dict[str, dict[str, Any]]:
    """One model of `preset`; for each named r schedule: warm up, then time. The batch is searched at the largest r
    any schedule can draw (truncated BPTT keeps memory flat in r beyond bptt_k): eagerly, then once more from there
    for the first compiled step, which halves again only if the compiled step needs more memory than eager; each
    optimizer step accumulates micro-batches up to `sizes.step_sequences` sequences."""
    cfg = GPTConfig.from_preset(preset, **sizes.overrides)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = GPT(cfg)
    model.train()
    step = TrainStep(model, D20_PRETRAIN_OPTIMIZER, device)
    r_search = cfg.recurrence.r_max if cfg.is_recursive else None

    def fits(batch: int) -> None:
        step.set_batch(batch)
        step(r_search)
        synchronize(device)

    batch, tried = largest_batch(fits, sizes.start_batch)
    log(f"{preset}: eager batch {batch} (tried {tried}); compiling")
    compiled = compile_model(model, sizes.compile_backend)
    before = dynamo_counts()
    batch, tried_compiled = largest_batch(fits, batch)
    step.set_batch(batch, grad_accum=max(1, sizes.step_sequences // batch))
    log(f"{preset}: compiled batch {batch} (tried {tried_compiled}), {step.grad_accum} micro-steps per step")
    common = {
        "preset": preset,
        "params": model.num_params(),
        "batch_tried_eager": tried,
        "batch_tried_compiled": tried_compiled,
        "optimizer": "muon + adamw",
        "autocast": "bfloat16",
        "compile": compiled,
    }
    out = {}
    for name, r_of in rs_of.items():
        for r in [r_of(i) for i in range(sizes.warmup_steps)]:
            step(r)
        synchronize(device)
        log(f"{name}: warmed up")
        timed = [r_of(sizes.warmup_steps + i) for i in range(sizes.timed_steps)]
        out[name] = {**common, **time_steps(step, timed, model, peak)}
        after = dynamo_counts()
        # graphs built since compiling (the first variant of a model includes its compile)
        out[name]["dynamo"] = {k: after[k] - before[k] for k in after}
        before = after
        log(f"{name}: {out[name]['tokens_per_s']:,.0f} tokens/s")
    return out


def training(sizes: Sizes, device: torch.device, peak: float | None, budget: Budget) -> dict[str, Any]:
    recurrence = GPTConfig.from_preset(sizes.recursive_preset, **sizes.overrides).recurrence
    r_mean = round(recurrence.mean)

    def r_poisson(step: int) -> int:
        return recurrence.sample(recur_generator(SEED, step))  # the pipeline's draw: same (seed, step), same r

    variants: dict[str, Any] = {}
    rec = train_variants(
        sizes.recursive_preset,
        {"d20_recursive_r4": lambda step: r_mean, "d20_recursive_rpoi": r_poisson},
        sizes,
        device,
        peak,
    )
    variants.update(rec)
    free_memory(device)
    if budget.spent():
        variants["d20"] = budget.skipped()
    else:
        variants.update(train_variants(sizes.baseline_preset, {"d20": lambda step: None}, sizes, device, peak))
        free_memory(device)
    ratios = {}
    for name in ("d20_recursive_r4", "d20_recursive_rpoi"):
        base, v = variants["d20"], variants[name]
        measured = "tokens_per_s" in base
        ratios[name] = {
            "tokens_per_s_ratio": v["tokens_per_s"] / base["tokens_per_s"] if measured else None,
            "model_flops_per_s_ratio": v["model_flops_per_s"] / base["model_flops_per_s"] if measured else None,
        }
    return {"variants": variants, "ratios_vs_d20": ratios, "recurrence": recurrence.to_dict()}


# ------------------------------------------------------------------------------------------------------- decode
def decode_model(preset: str, sizes: Sizes, device: torch.device) -> tuple[GPT, Tokenizer]:
    """Random weights (the default init makes every block the identity), bf16 on CUDA as served, fp32 on CPU."""
    cfg = GPTConfig.from_preset(preset, **sizes.overrides)
    with torch.device(device):
        model = GPT(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return randomize_(model, seed=SEED, std=0.05).to(dtype=dtype).eval(), byte_pair_tokenizer(cfg.vocab_size)


def decode_rate(
    engine: Engine,
    prompts: list[list[int]],
    num_recur: int | None,
    kv_cache: str,
    max_tokens: int,
    device: torch.device,
) -> dict[str, Any]:
    """Generated tokens per second of one greedy `Engine.generate` call (prefill included), after a short warm-up."""
    kw = dict(num_recur=num_recur, kv_cache=kv_cache, temperature=0.0)
    for _ in engine.generate(prompts, max_tokens=2, **kw):
        pass
    synchronize(device)
    t0, per_row, steps = time.perf_counter(), [0] * len(prompts), 0
    for step in engine.generate(prompts, max_tokens=max_tokens, **kw):
        for b, ts in enumerate(step):
            per_row[b] += ts is not None
        steps += 1
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": sum(per_row) / seconds,
        "generated_tokens": sum(per_row),
        "decode_steps": steps,
        "ms_per_step": 1000 * seconds / steps,
        "tokens_per_row_min": min(per_row),
        "tokens_per_row_max": max(per_row),
    }


def decode(
    preset: str,
    strategies: tuple[str, ...],
    model: GPT,
    tokenizer: Tokenizer,
    sizes: Sizes,
    device: torch.device,
    budget: Budget,
) -> dict[str, Any]:
    """Tokens/s of `Engine.generate` per KV strategy at each batch of DECODE_BATCHES."""
    engine = Engine(model, tokenizer)
    r = model.config.decode.num_recur if model.config.is_recursive else None
    g = torch.Generator().manual_seed(SEED)
    out: dict[str, Any] = {"preset": preset, "num_recur": r, "dtype": str(next(model.parameters()).dtype)}
    for strategy in strategies:
        for batch in DECODE_BATCHES:
            key = f"{strategy}_batch{batch}"
            if budget.spent():
                out[key] = budget.skipped()
                continue
            prompts = torch.randint(0, 256, (batch, sizes.prompt_tokens), generator=g).tolist()  # byte tokens
            out[key] = decode_rate(engine, prompts, r, strategy, sizes.decode_tokens, device)
    return out


# ---------------------------------------------------------------------------------------- continuous batching
def mixed_budget_trace(n: int, max_prompt: int, max_new: int, r_max: int = 8) -> list[dict[str, int]]:
    """n requests with budgets r = 1..r_max in turn, spread prompt and output lengths, and Poisson arrivals (one per
    engine step on average), all fixed by SEED."""
    g = torch.Generator().manual_seed(SEED)
    gaps = torch.empty(n).exponential_(1.0, generator=g)
    arrival = torch.cumsum(gaps, 0).floor().long().tolist()
    return [
        {
            "arrival_step": arrival[i],
            "num_recur": 1 + i % r_max,
            "prompt_tokens": 1 + int(torch.randint(max(1, max_prompt // 4), max_prompt, (), generator=g)),
            "max_tokens": 1 + int(torch.randint(max(1, max_new // 4), max_new, (), generator=g)),
        }
        for i in range(n)
    ]


def continuous_batching(
    model: GPT, tokenizer: Tokenizer, sizes: Sizes, device: torch.device, budget: Budget
) -> dict[str, Any]:
    """Tokens/s of recursive_model's continuous-batching engine on a mixed-budget trace ("not available" without
    one): every request is submitted at its arrival step and the engine steps until all are done."""
    engine_cls = getattr(recursive_model, "ContinuousEngine", None)
    if engine_cls is None:
        return {"status": "not available", "reason": "recursive_model has no ContinuousEngine"}
    if budget.spent():
        return budget.skipped()
    n = sizes.batching_requests
    trace = mixed_budget_trace(n, max_prompt=4 * sizes.prompt_tokens, max_new=sizes.decode_tokens)
    g = torch.Generator().manual_seed(SEED + 1)
    prompts = [torch.randint(0, 256, (req["prompt_tokens"],), generator=g).tolist() for req in trace]
    reserved = sum(req["prompt_tokens"] + req["max_tokens"] + 16 for req in trace)  # + a KV block of rounding each
    engine = engine_cls(
        model,
        tokenizer,
        kv_cache="exact",
        max_recur=max(req["num_recur"] for req in trace),
        kv_tokens=reserved,
        max_running=n,
    )
    submitted, first_token, generated, steps = {}, {}, 0, 0
    synchronize(device)
    t0 = time.perf_counter()
    pending = list(range(n))
    while pending or engine.has_work:
        while pending and trace[pending[0]]["arrival_step"] <= steps:
            i = pending.pop(0)
            req = trace[i]
            sid = engine.submit(
                prompts[i],
                recursive_model.SamplingParams(max_tokens=req["max_tokens"], temperature=0.0, seed=i),
                recursive_model.DecodeSettings(num_recur=req["num_recur"]),
            )
            submitted[sid] = time.perf_counter()
        for ev in engine.step():
            if ev.step is not None:
                generated += 1
                first_token.setdefault(ev.seq_id, time.perf_counter())
        steps += 1
    synchronize(device)
    seconds = time.perf_counter() - t0
    ttft = sorted(first_token[sid] - submitted[sid] for sid in first_token)
    return {
        "status": "measured",
        "engine": f"{engine_cls.__module__}.{engine_cls.__name__}",
        "requests": n,
        "num_recur_range": [1, max(req["num_recur"] for req in trace)],
        "kv_cache": "exact",
        "sampling": "greedy",
        "tokens_per_s": generated / seconds,
        "generated_tokens": generated,
        "engine_steps": steps,
        "seconds": seconds,
        "mean_recur": engine.stats()["mean_recur"],
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
    }


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--start-batch",
        type=int,
        default=None,
        help=f"first micro-batch tried; halved on OOM (default {D20_PRETRAIN_SEQUENCES})",
    )
    p.add_argument("--timed-steps", type=int, default=None, help="timed training steps per variant (default 10)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="phases that would start after this many seconds are skipped (default 420)",
    )
    args = p.parse_args()
    overrides = {k: v for k, v in (("start_batch", args.start_batch), ("timed_steps", args.timed_steps)) if v}
    sizes = dataclasses.replace(QUICK if args.quick else FULL, **overrides)
    if not args.quick and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (use --quick for the CPU smoke run)")
    device = torch.device("cpu" if args.quick else "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left outside autocast
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = device_peak_flops(device)
    budget = Budget(args.budget_s)
    train = training(sizes, device, peak, budget)
    model, tokenizer = decode_model(sizes.recursive_preset, sizes, device)
    dec = {"d20_recursive": decode(sizes.recursive_preset, STRATEGIES, model, tokenizer, sizes, device, budget)}
    batching = continuous_batching(model, tokenizer, sizes, device, budget)
    del model, tokenizer
    free_memory(device)
    model, tokenizer = decode_model(sizes.baseline_preset, sizes, device)
    # d20 has no recurrent layers: every KV strategy is the same cache there
    dec["d20"] = decode(sizes.baseline_preset, ("exact",), model, tokenizer, sizes, device, budget)
    del model, tokenizer
    r4, ratio = train["variants"]["d20_recursive_r4"], train["ratios_vs_d20"]["d20_recursive_r4"]["tokens_per_s_ratio"]
    claimed = not args.quick
    goal_met = None
    if claimed and ratio is not None and r4["mfu"] is not None:
        goal_met = ratio >= 0.95 and r4["mfu"] >= 0.45
    emit(
        {
            "benchmark": "gpu",
            "quick": args.quick,
            "figures_claimed": claimed,  # --quick runs toy sizes on CPU: structure only
            "device": device_name,
            "peak_flops": peak,
            "peak_flops_source": "recursive_model.optim.PEAK_FLOPS by device name (dense bf16)",
            "sizes": dataclasses.asdict(sizes),
            "training": train,
            "decode": {
                "prompt_tokens": sizes.prompt_tokens,
                "new_tokens": sizes.decode_tokens,
                "sampling": "greedy",
                **dec,
            },
            "continuous_batching": batching,
            "goal": "ratios_vs_d20.d20_recursive_r4.tokens_per_s_ratio >= 0.95 and d20_recursive_r4 mfu >= 0.45",
            "goal_met": goal_met,
            "wall_seconds": budget.elapsed(),
            "env": {
                **environment(),
                "cuda": torch.version.cuda,
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
            },
        }
    )


if __name__ == "__main__":
    main()
