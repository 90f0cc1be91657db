"""Greedy decoding with the exact KV cache vs recomputing the full forward for every new token; KV-cache memory.

Speed: one model (cpu-small shape, every weight random so greedy decoding is not degenerate), batch 1, a short
prompt, then `new_tokens` greedy tokens. `cached` prefills the prompt with `forward_cached` and then feeds one token
at a time; `cached_compiled` does the same after `model.compile_decode()` (fixed r, no exit: each token is one
compiled graph, prelude to head; the serving path); `recompute` runs `model(idx)` over the whole sequence for each
new token. Runs are interleaved and a speed-up is the median of per-repetition time ratios;
`speedup_cached_vs_recompute` is the compiled one. All must produce the same tokens (exact cache = full forward).
Compile time is excluded (warm-up run).
Memory: `KVCache.nbytes()` for a sequence of 256 tokens, per strategy (exact, ring:2, final) at r = 4 and r = 8, for
the benchmark model and the d20-recursive reference shape (built on the meta device, no memory used).

    python benchmarks/decode.py [--quick]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch

from benchmarks._common import emit, environment, interleaved, median, median_ratio, parser, randomize_
from recursive_model import GPT, GPTConfig
from recursive_model.kv_cache import KVCache
from recursive_model.recurrence import DecodeSettings

STRATEGIES = ("exact", "ring:2", "final")


@torch.inference_mode()
def decode_cached(model: GPT, prompt: torch.Tensor, new_tokens: int, r: int) -> list[int]:
    settings = DecodeSettings(num_recur=r, kv_cache="exact")  # fixed r, no exit: the same work as the recompute
    cache = KVCache(model.config, prompt.size(0), prompt.size(1) + new_tokens, num_recur=r, strategy="exact")
    logits, _, _ = model.forward_cached(prompt, cache, settings)
    out = []
    for i in range(new_tokens):
        tok = logits.argmax(dim=-1)  # (B,)
        out.append(int(tok[0]))
        if i + 1 < new_tokens:
            logits, _, _ = model.forward_cached(tok[:, None], cache, settings)
    return out


@torch.inference_mode()
def decode_recompute(model: GPT, prompt: torch.Tensor, new_tokens: int, r: int) -> list[int]:
    idx, out = prompt, []
    for _ in range(new_tokens):
        tok = model(idx, num_recur=r)[:, -1].argmax(dim=-1)
        out.append(int(tok[0]))
        idx = torch.cat([idx, tok[:, None]], dim=1)
    return out


def cache_memory(cfg: GPTConfig, seq: int, device: str) -> dict:
    out = {}
    for r in (4, 8):
        nbytes = {s: KVCache(cfg, 1, seq, num_recur=r, strategy=s, device=device).nbytes() for s in STRATEGIES}
        out[f"r{r}"] = {"bytes": nbytes, "ratio_to_exact": {s: nbytes[s] / nbytes["exact"] for s in STRATEGIES}}
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (decode at this width is launch-bound; extra "
                   "OpenMP threads only contend on a shared machine)")
    p.add_argument("--backend", default=None, help="torch.compile backend of the compiled decode (default inductor; "
                   "aot_eager with --quick)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = GPTConfig.from_preset("tiny", sequence_len=64, recurrence=dict(r_max=8), decode=dict(num_recur=4))
        prompt_len, new_tokens, reps = 8, 24, 2
    else:
        cfg = GPTConfig.from_preset("cpu-small", sequence_len=512, recurrence=dict(r_max=8), decode=dict(num_recur=4))
        prompt_len, new_tokens, reps = 16, 256, 5
    r = cfg.decode.num_recur
    torch.manual_seed(0)
    model = randomize_(GPT(cfg), seed=0, std=0.05).eval()
    compiled = copy.deepcopy(model)
    compiled.compile_decode(backend=args.backend or ("aot_eager" if args.quick else "inductor"))
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))

    outputs: dict[str, list[int]] = {}

    def run(name, fn, m=model):
        def call():
            outputs[name] = fn(m, prompt, new_tokens, r)

        return call

    times = interleaved(
        {"cached": run("cached", decode_cached), "recompute": run("recompute", decode_recompute),
         "cached_compiled": run("cached_compiled", decode_cached, compiled)}, reps=reps, warmup=1
    )
    same = [a == b for a, b in zip(outputs["cached"], outputs["recompute"], strict=True)]
    same_compiled = outputs["cached_compiled"] == outputs["cached"]
    speedup_eager = median_ratio(times["recompute"], times["cached"])
    speedup = median_ratio(times["recompute"], times["cached_compiled"])
    with torch.device("meta"):
        d20 = GPT(GPTConfig.from_preset("d20-recursive"))
    emit(
        {
            "benchmark": "decode",
            "quick": args.quick,
            "config": {
                k: getattr(cfg, k)
                for k in ("vocab_size", "n_embd", "n_head", "n_kv_head", "n_prelude", "n_recur", "n_coda")
            },
            "num_recur": r,
            "params": model.num_params(),
            "batch": 1,
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "reps": reps,
            "tokens_per_s": {name: median([new_tokens / s for s in ts]) for name, ts in times.items()},
            "seconds_all_reps": {name: [round(s, 3) for s in ts] for name, ts in times.items()},
            "threads": args.threads,
            # the serving path: compile_decode() (one whole-token graph at fixed r) over the paged cache
            "speedup_cached_vs_recompute": speedup,
            "speedup_eager_cached_vs_recompute": speedup_eager,
            # fastest run of each side: the least disturbed by other load on the machine
            "speedup_best_vs_best": min(times["recompute"]) / min(times["cached_compiled"]),
            "greedy_tokens_match": all(same) and same_compiled,
            "greedy_tokens_matching_prefix": same.index(False) if False in same else len(same),
            "kv_cache_seq": 256,
            "kv_cache_memory": cache_memory(cfg, 256, "cpu"),
            "kv_cache_memory_d20_recursive": {"params": d20.num_params(), **cache_memory(d20.config, 256, "meta")},
            "goal": "speedup_cached_vs_recompute >= 10",
            "goal_met": speedup >= 10,
            "env": environment(),
        }
    )


if __name__ == "__main__":
    main()
