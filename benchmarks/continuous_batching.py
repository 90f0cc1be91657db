"""Continuous batching: does an early exit save time in a batch, and does admitting rows every step pay?

(a) A batch of 16 decodes with adaptive exit (latent rule, budget r_max) and again at fixed r_max, interleaved.
    `adaptive_time_ratio` = wall time of the decode steps adaptive / fixed; `mean_recur_ratio` = mean recurrences
    used / r_max over the decoded tokens (the admission step, which prefills every prompt at the full budget in both
    runs, is timed apart: `adaptive_time_ratio_with_prefill`).
    Goal: adaptive_time_ratio <= mean_recur_ratio + 0.15 (compute follows exits; the rest is per-token overhead that
    does not shrink with r: prelude, coda, sampling). `flop_floor_ratio`: the time ratio if time followed FLOPs.
(b) A trace of 64 requests with Poisson arrivals (mean gap = a request's time alone / 8, measured first, so the
    offered load is the same on any machine), budgets r in 1..8, prompt lengths and max_tokens mixed, replayed in
    real time against one ContinuousEngine and against a static batcher (the policy the serve layer used before: a
    batch holds requests of equal settings, starts when the engine is idle and runs until its last row ends;
    arrivals wait). Both run on the same model code, so the ratio isolates the scheduling policy.
    `throughput_vs_static` = generated tokens/s ratio (goal >= 2); p50/p99 time to first token of both. The trace
    is replayed a second time with `min_step_recur` (deeper tokens carried over steps, so cheap requests do not wait
    for deep batch mates): `throughput_vs_static_min_step_recur`, and per-token latency of cheap / deep requests.
(c) `batch_invariant`: every traced request run alone reproduces its tokens and recurrences from the trace.

The model has cpu-small's shape with every weight random and its recurrence made contractive (the state enters the
adapter weakly), so the latent exit fires at different depths per token as in a trained model; no checkpoint needed.

    python benchmarks/continuous_batching.py [--quick]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch

from benchmarks._common import emit, environment, median, median_ratio, parser, randomize_
from recursive_model import GPT, GPTConfig
from recursive_model.batching import ContinuousEngine, SamplingParams
from recursive_model.recurrence import DecodeSettings, ExitRule
from recursive_model.tokenizer import SPECIAL_TOKENS

OFFERED_CONCURRENCY = 8  # requests in flight on average if each were served alone


class IdsOnly:
    """The tokenizer surface the engine needs (special-token ids; text only for the calculator, never reached here)."""

    def __init__(self, vocab_size: int):
        self._ids = {name: vocab_size - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, name: str) -> int:
        return self._ids[name]

    def decode(self, ids: list[int]) -> str:
        return ""

    def encode(self, text: str) -> list[int]:
        return []


def contractive_model(cfg: GPTConfig, gain: float = 0.3) -> GPT:
    model = randomize_(GPT(cfg), std=0.05).eval()
    with torch.no_grad():
        model.adapter.weight[:, cfg.n_embd:] *= gain
    return model


def batch_exit(model: GPT, tok: IdsOnly, batch: int, r_max: int, new_tokens: int, threshold: float, reps: int) -> dict:
    prompts = [[(7 * b + 3 * i) % (model.config.vocab_size - 16) for i in range(8 + b % 5)] for b in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    rule = ExitRule(criterion="latent", threshold=threshold)
    spent = {}

    def run(exit_rule) -> tuple[float, float]:
        """(seconds of the whole batch, seconds of its decode steps: after the step that prefilled every prompt)."""
        eng = ContinuousEngine(model, tok, max_recur=r_max, kv_tokens=batch * (16 + new_tokens + 16))
        settings = DecodeSettings(num_recur=r_max, exit=exit_rule)
        for p in prompts:
            eng.submit(p, params, settings)
        recurs, deepest = [], []
        t0 = time.perf_counter()
        eng.step()  # admission: every prompt prefilled at the full budget (what no exit can shorten)
        t1 = time.perf_counter()
        while eng.has_work:
            used = [ev.step.num_recur for ev in eng.step() if ev.step is not None]
            recurs += used
            deepest.append(max(used, default=0))
        t2 = time.perf_counter()
        spent[exit_rule is not None] = (recurs, deepest)
        return t2 - t0, t2 - t1

    run(rule), run(None)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"adaptive": [], "fixed": []}
    for _ in range(reps):  # interleaved: machine noise hits both alike
        times["adaptive"].append(run(rule))
        times["fixed"].append(run(None))
    recurs, deepest = spent[True]
    mean_r = sum(recurs) / len(recurs)
    f0, f1 = model.flops_per_token(0, training=False), model.flops_per_token(1, training=False)  # linear in r
    decode = {k: [d for _, d in v] for k, v in times.items()}
    total = {k: [t for t, _ in v] for k, v in times.items()}
    return {"batch": batch, "r_max": r_max, "new_tokens": new_tokens, "exit": str(rule), "n_embd": model.config.n_embd,
            "mean_recur": mean_r, "mean_recur_ratio": mean_r / r_max,
            # a step lasts as long as its deepest row: the floor of the time ratio when launches, not FLOPs, dominate
            "step_deepest_ratio": sum(deepest) / len(deepest) / r_max,
            # FLOPs per token at the mean used r / at r_max: the time ratio if time followed FLOPs (prelude, coda and
            # head run whatever the exit)
            "flop_floor_ratio": (f0 + mean_r * (f1 - f0)) / (f0 + r_max * (f1 - f0)),
            # decode steps only: the tokens whose recurrences `mean_recur` counts
            "adaptive_time_ratio": median_ratio(decode["adaptive"], decode["fixed"]),
            # with the admission step (prompts at the full budget in both runs)
            "adaptive_time_ratio_with_prefill": median_ratio(total["adaptive"], total["fixed"]),
            "seconds": {k: median(v) for k, v in decode.items()},
            "seconds_with_prefill": {k: median(v) for k, v in total.items()}}


def make_trace(n: int, vocab: int, seed: int, mean_gap_s: float) -> list[dict]:
    rng = random.Random(seed)
    t, trace = 0.0, []
    for i in range(n):
        t += rng.expovariate(1.0 / mean_gap_s)
        r = rng.randint(1, 8)
        prompt = [rng.randrange(vocab - 16) for _ in range(rng.randint(4, 48))]
        trace.append({"i": i, "at": t, "prompt": prompt, "max_tokens": rng.randint(8, 48),
                      "decode": DecodeSettings(num_recur=r)})
    return trace


def replay_continuous(model: GPT, tok: IdsOnly, trace: list[dict], min_step_recur: int | None = None) -> dict:
    eng = ContinuousEngine(model, tok, max_recur=8, kv_tokens=64 * 128, max_running=64, prefill_chunk=64,
                           min_step_recur=min_step_recur)
    return _replay(trace, lambda req: eng.submit(req["prompt"], SamplingParams(max_tokens=req["max_tokens"],
                                                                              temperature=0.0), req["decode"]),
                   eng.step, lambda: eng.has_work)


def replay_static(model: GPT, tok: IdsOnly, trace: list[dict], max_batch: int = 16) -> dict:
    """One batch at a time: equal settings only, admitted when the engine is idle, run until its last row ends."""
    waiting: list[tuple[int, dict]] = []
    state = {"eng": None, "next_id": 0, "map": {}}

    def submit(req):
        sid = state["next_id"]
        state["next_id"] += 1
        waiting.append((sid, req))
        return sid

    def step():
        eng = state["eng"]
        if eng is None or not eng.has_work:
            if not waiting:
                return []
            key = waiting[0][1]["decode"]
            batch = [(s, q) for s, q in waiting if q["decode"] == key][:max_batch]
            for item in batch:
                waiting.remove(item)
            eng = state["eng"] = ContinuousEngine(model, tok, max_recur=8, kv_tokens=max_batch * 128,
                                                  max_running=max_batch, prefill_chunk=64)
            state["map"] = {eng.submit(q["prompt"], SamplingParams(max_tokens=q["max_tokens"], temperature=0.0),
                                       q["decode"]): s for s, q in batch}
        events = eng.step()
        for ev in events:
            ev.seq_id = state["map"][ev.seq_id]
        return events

    return _replay(trace, submit, step, lambda: bool(waiting) or (state["eng"] is not None and state["eng"].has_work))


def _replay(trace, submit, step, busy) -> dict:
    t0 = time.perf_counter()
    pending = sorted(trace, key=lambda q: q["at"])
    ids: dict[int, int] = {}
    first: dict[int, float] = {}
    done_at: dict[int, float] = {}
    out: dict[int, list[tuple[int, int]]] = {q["i"]: [] for q in trace}
    tokens = 0
    while pending or busy():
        now = time.perf_counter() - t0
        while pending and pending[0]["at"] <= now:
            q = pending.pop(0)
            ids[submit(q)] = q["i"]
        if not busy():
            time.sleep(min(0.002, max(0.0, pending[0]["at"] - now)) if pending else 0)
            continue
        events = step()
        for ev in events:
            if ev.step is None:
                continue
            i = ids[ev.seq_id]
            first.setdefault(i, time.perf_counter() - t0 - trace[i]["at"])
            out[i].append((ev.step.token, ev.step.num_recur))
            tokens += 1
        for ev in events:
            if ev.finished:
                i = ids[ev.seq_id]
                done_at[i] = time.perf_counter() - t0 - trace[i]["at"]
    wall = time.perf_counter() - t0
    ttft = sorted(first.values())
    # latency per generated token of the cheap (r <= 2) and the deep (r >= 7) requests: what sharing costs each
    per_token = {name: median([done_at[q["i"]] / max(1, len(out[q["i"]])) for q in trace
                               if test(q["decode"].num_recur)])
                 for name, test in (("low_r_le_2", lambda r: r <= 2), ("deep_r_ge_7", lambda r: r >= 7))}
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": ttft[len(ttft) // 2], "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "latency_per_token_p50_s": per_token, "outputs": out}


def run_alone(model: GPT, tok: IdsOnly, q: dict) -> list[tuple[int, int]]:
    eng = ContinuousEngine(model, tok, max_recur=8, kv_tokens=256, prefill_chunk=64)
    eng.submit(q["prompt"], SamplingParams(max_tokens=q["max_tokens"], temperature=0.0), q["decode"])
    out = []
    while eng.has_work:
        out += [(ev.step.token, ev.step.num_recur) for ev in eng.step() if ev.step is not None]
    return out


def check_invariance(model: GPT, tok: IdsOnly, trace: list[dict], outputs: dict, n: int) -> bool:
    return all(run_alone(model, tok, q) == outputs[q["i"]] for q in trace[:n])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: decode at these widths is launch-bound, "
                   "and extra OpenMP threads only contend on a shared machine)")
    p.add_argument("--min-step-recur", type=int, default=1,
                   help="the trace is also replayed with deeper tokens carried over steps (ContinuousEngine option)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        cfg = GPTConfig.from_preset("tiny", recurrence=dict(r_max=16))
        batch, new_tokens, reps, n_req = 4, 6, 1, 10
    else:
        cfg = GPTConfig.from_preset("cpu-small", recurrence=dict(r_max=16))
        batch, new_tokens, reps, n_req = 16, 48, 5, 64
    model = contractive_model(cfg)
    tok = IdsOnly(cfg.vocab_size)
    exit_part = batch_exit(model, tok, batch, 16, new_tokens, threshold=0.02, reps=reps)
    # The same at 4x the width, where a recurrence's FLOPs (which exits save) outweigh its launch overhead.
    wide_cfg = GPTConfig.from_preset("tiny" if args.quick else "cpu-small", recurrence=dict(r_max=16),
                                     n_embd=4 * cfg.n_embd, n_head=4 * cfg.n_head, n_kv_head=4 * cfg.n_kv_head)
    exit_wide = batch_exit(contractive_model(wide_cfg), tok, batch, 16, new_tokens, threshold=0.02, reps=reps)
    # Offered load independent of the machine's speed: arrivals every (a request's time alone) / CONCURRENCY on average.
    probe = make_trace(8, cfg.vocab_size, seed=2, mean_gap_s=1.0)
    t0 = time.perf_counter()
    for q in probe:
        run_alone(model, tok, q)
    gap = (time.perf_counter() - t0) / len(probe) / OFFERED_CONCURRENCY
    trace = make_trace(n_req, cfg.vocab_size, seed=1, mean_gap_s=gap)
    cont = replay_continuous(model, tok, trace)
    carry = replay_continuous(model, tok, trace, min_step_recur=args.min_step_recur)
    static = replay_static(model, tok, trace)
    invariant = check_invariance(model, tok, trace, cont["outputs"], n=min(len(trace), 16 if not args.quick else 4))
    same_outputs = cont["outputs"] == static["outputs"] == carry["outputs"]
    for d in (cont, carry, static):
        d.pop("outputs")
    result = {
        "benchmark": "continuous_batching",
        "quick": args.quick,
        "model": {"preset": "tiny" if args.quick else "cpu-small", "n_embd": cfg.n_embd},
        "adaptive_exit": exit_part,
        "adaptive_exit_wide": exit_wide,
        "adaptive_time_ratio": exit_part["adaptive_time_ratio"],
        "mean_recur_ratio": exit_part["mean_recur_ratio"],
        "trace": {"requests": n_req, "mean_gap_s": gap, "offered_concurrency": OFFERED_CONCURRENCY,
                  "continuous": cont, f"continuous_min_step_recur_{args.min_step_recur}": carry, "static": static},
        "throughput_vs_static": cont["tokens_per_s"] / static["tokens_per_s"],
        "throughput_vs_static_min_step_recur": carry["tokens_per_s"] / static["tokens_per_s"],
        "ttft_p50_s": {"continuous": cont["ttft_p50_s"], "static": static["ttft_p50_s"]},
        "ttft_p99_s": {"continuous": cont["ttft_p99_s"], "static": static["ttft_p99_s"]},
        "batch_invariant": invariant and same_outputs,
        "goal": {"adaptive_time_ratio": "<= mean_recur_ratio + 0.15", "throughput_vs_static": ">= 2",
                 "batch_invariant": True},
        "goal_met": {
            "adaptive_time": exit_part["adaptive_time_ratio"] <= exit_part["mean_recur_ratio"] + 0.15,
            "adaptive_time_wide": exit_wide["adaptive_time_ratio"] <= exit_wide["mean_recur_ratio"] + 0.15,
            "throughput": cont["tokens_per_s"] / static["tokens_per_s"] >= 2,
            "batch_invariant": invariant and same_outputs,
        },
        "env": environment(),
    }
    emit(result)


if __name__ == "__main__":
    main()
