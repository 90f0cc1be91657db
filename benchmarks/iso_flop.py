"""Training throughput of a d20-recursive-shaped model vs a d20-shaped plain GPT at a CPU-sized width.

Same layer counts as the reference pair: (P, R, C) = (2, 4, 2) at r = 4 (effective depth 20) vs 20 plain layers; same
head_dim as d20 (128), so n_head = n_embd / 128. One timed unit is `steps` full training steps (forward, backward,
AdamW); variants run interleaved A, B, C, ... and every ratio is the median of per-repetition ratios. Variants:
  baseline         d20-shaped plain GPT
  recursive_r4     r fixed at the mean (4), bptt_k=4: full backprop at r=4, the fair iso-FLOP comparison
  recursive_rpoi   r ~ Poisson log-normal (mean 4, clamp 16) drawn per step with recur_generator(seed, step)
  recursive_r4_k2  r=4 with bptt_k=2: only the last 2 recurrences are differentiated

    python benchmarks/iso_flop.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch

from benchmarks._common import emit, environment, interleaved, median, median_ratio, parser
from recursive_model import GPT, GPTConfig, recur_generator

NOTES = (
    "bptt_k=4 at r=4 is full backprop; rpoi draws r per step (steps with r > 4 run r-4 recurrences forward-only), so "
    "compare it through model_flops_per_s_ratio; flops_per_token counts matmul + attention FLOPs incl. the recursive "
    "model's concat adapter (one Linear(2D->D) per recurrence)"
)


class Trainer:
    """One model + AdamW; `run()` does `steps` training steps at the recurrence count `r_of(step)`."""

    def __init__(self, cfg: GPTConfig, batch: int, steps: int, r_of, seed: int = 0):
        torch.manual_seed(seed)
        self.model = GPT(cfg).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, cfg.vocab_size, (batch, cfg.sequence_len), generator=g)
        self.y = torch.randint(0, cfg.vocab_size, (batch, cfg.sequence_len), generator=g)
        self.steps, self.r_of, self.step = steps, r_of, 0
        self.r_history: list[list[int]] = []  # r of each step, one list per call of run()

    def run(self) -> None:
        rs = []
        for _ in range(self.steps):
            r = self.r_of(self.step)
            self.opt.zero_grad(set_to_none=True)
            self.model(self.x, targets=self.y, num_recur=r).backward()
            self.opt.step()
            self.step += 1
            rs.append(r)
        self.r_history.append(rs)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    if args.quick:
        shape = dict(vocab_size=512, sequence_len=64, n_embd=64, n_head=2, n_kv_head=2)
        batch, steps, reps, warmup = 2, 1, 2, 1
    else:
        shape = dict(vocab_size=4096, sequence_len=256, n_embd=256, n_head=2, n_kv_head=2)
        batch, steps, reps, warmup = 4, 1, 15, 2
    seed = 0
    base_cfg = GPTConfig.from_preset("d20", **shape)
    rec_cfg = GPTConfig.from_preset("d20-recursive", **shape)
    rec_k2_cfg = GPTConfig.from_preset("d20-recursive", recurrence=dict(bptt_k=2), **shape)
    rec = rec_cfg.recurrence
    r_mean = int(rec.mean)

    def r_poisson(step: int) -> int:
        return rec.sample(recur_generator(seed, step))

    trainers = {
        "baseline": Trainer(base_cfg, batch, steps, lambda step: None),
        "recursive_r4": Trainer(rec_cfg, batch, steps, lambda step: r_mean),
        "recursive_rpoi": Trainer(rec_cfg, batch, steps, r_poisson),
        "recursive_r4_k2": Trainer(rec_k2_cfg, batch, steps, lambda step: r_mean),
    }
    times = interleaved({name: t.run for name, t in trainers.items()}, reps=reps, warmup=warmup)
    tokens_per_call = batch * shape["sequence_len"] * steps

    variants, flops_of_call = {}, {}
    for name, t in trainers.items():
        calls = t.r_history[warmup:]  # r of every step of every timed call
        if t.model.config.is_recursive:
            flops_of_call[name] = [sum(t.model.flops_per_token(r) for r in rs) / len(rs) for rs in calls]
        else:
            flops_of_call[name] = [t.model.flops_per_token()] * len(calls)
        tok_s = [tokens_per_call / s for s in times[name]]
        flops = sum(flops_of_call[name]) / len(calls)
        variants[name] = {
            "tokens_per_s": median(tok_s),
            "tokens_per_s_best": max(tok_s),
            "tokens_per_s_all_reps": [round(v, 1) for v in tok_s],
            "params": t.model.num_params(),
            "effective_depth": t.model.effective_depth(r_mean if t.model.config.is_recursive else None),
            "bptt_k": t.model.config.recurrence.bptt_k if t.model.config.is_recursive else None,
            "flops_per_token": flops,  # mean over the timed steps
            "model_flops_per_s": median([f * v for f, v in zip(flops_of_call[name], tok_s, strict=True)]),
        }
        if t.model.config.is_recursive:
            timed_rs = [r for rs in calls for r in rs]
            variants[name]["r_timed_steps"] = timed_rs
            variants[name]["r_mean_timed_steps"] = sum(timed_rs) / len(timed_rs)
    ratios = {}
    base_t, base_f = times["baseline"], flops_of_call["baseline"]
    for name in ("recursive_r4", "recursive_rpoi", "recursive_r4_k2"):
        t_, f_ = times[name], flops_of_call[name]
        ratios[name] = {
            # per repetition: tokens/s ratio = inverse time ratio of neighbouring calls
            "tokens_per_s_ratio": median_ratio(base_t, t_),
            # fastest call of each (least disturbed by the machine); only meaningful when every call has the same r
            "tokens_per_s_ratio_best": min(base_t) / min(t_) if len(set(f_)) == 1 else None,
            "flops_per_token_ratio": variants[name]["flops_per_token"] / variants["baseline"]["flops_per_token"],
            # achieved model FLOP/s, per repetition with the FLOPs of that call's r: hardware efficiency vs baseline
            "model_flops_per_s_ratio": median(
                [(f / a) / (fb / b) for f, a, fb, b in zip(f_, t_, base_f, base_t, strict=True)]
            ),
        }
    ratio = ratios["recursive_r4"]["tokens_per_s_ratio"]
    emit(
        {
            "benchmark": "iso_flop",
            "quick": args.quick,
            "shape": {
                **shape,
                "batch": batch,
                "steps_per_timed_call": steps,
                "reps": reps,
                "baseline_layers": base_cfg.n_prelude,
                "recursive_PRC": [rec_cfg.n_prelude, rec_cfg.n_recur, rec_cfg.n_coda],
                "r_mean": r_mean,
                "r_max": rec.r_max,
                "recur_sigma": rec.sigma,
            },
            "variants": variants,
            "ratios_vs_baseline": ratios,
            "ratio_tokens_per_s_recursive_r4": ratio,
            "goal": "ratio_tokens_per_s_recursive_r4 >= 0.95",
            "goal_met": ratio >= 0.95,
            "notes": NOTES,
            "env": environment(),
        }
    )


if __name__ == "__main__":
    main()
