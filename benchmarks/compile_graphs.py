"""Graphs built by compiling one recurrence vs compiling the whole forward, over r = 1..16 in training and eval.

`model.compile_recurrence()` compiles `recur_step` once; the Python loop over r stays outside the graph, so r never
triggers a recompile (expected: 2 graphs, the no-grad step used by frozen recurrences and eval, and the differentiated
step). `torch.compile(model, dynamic=True)` unrolls the loop: every new r (and train vs eval) is a new graph until
dynamo's recompile limit, after which the forward silently runs eagerly.

    python benchmarks/compile_graphs.py [--quick] [--backend inductor|aot_eager|eager]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from benchmarks._common import emit, environment, parser, randomize_
from recursive_model import GPT, GPTConfig

NOTES = (
    "max_abs_diff_vs_eager compares eval logits at every r; once the whole-forward compile hits the recompile limit "
    "its calls run eagerly, so its diff is then trivially 0"
)


def run_over_r(model: GPT, forward, x: torch.Tensor, rs: list[int], eager_logits: dict[int, torch.Tensor]) -> dict:
    """Train (forward+backward) then eval at every r through `forward`; graph counts and max |logits - eager|."""
    torch._dynamo.reset()
    counters.clear()
    graphs_after_train = []
    t0 = time.perf_counter()
    model.train()
    for r in rs:
        model.zero_grad(set_to_none=True)
        forward(x, targets=x, num_recur=r).backward()
        graphs_after_train.append(int(counters["stats"]["unique_graphs"]))
    model.eval()
    max_diff = 0.0
    with torch.no_grad():
        for r in rs:
            max_diff = max(max_diff, (forward(x, num_recur=r) - eager_logits[r]).abs().max().item())
    seconds = time.perf_counter() - t0
    recompile_limit_hits = sum(n for k, n in counters["unimplemented"].items() if "recompile limit" in k.lower())
    out = {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "unique_graphs_after_train_r": dict(zip(rs, graphs_after_train, strict=True)),
        # 0 with a graph count that stopped growing in training means eval ran eagerly (recompile limit reached)
        "unique_graphs_added_by_eval": int(counters["stats"]["unique_graphs"]) - graphs_after_train[-1],
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "recompile_limit_hits": int(recompile_limit_hits),
        "max_abs_diff_vs_eager": max_diff,
        "wall_seconds_incl_compile": round(seconds, 2),
    }
    torch._dynamo.reset()
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--r-max", type=int, default=16, help="run r = 1..r_max")
    p.add_argument(
        "--baseline-r-max",
        type=int,
        default=None,
        help="whole-forward baseline runs r = 1..this (default r_max; 2 with --quick: tracing it is slow)",
    )
    p.add_argument(
        "--baseline-backend",
        default=None,
        help="backend of the whole-forward baseline (default --backend; 'eager' with --quick). Graph "
        "counts are dynamo's and do not depend on the backend",
    )
    args = p.parse_args()
    if args.quick:
        cfg = GPTConfig.from_preset("tiny", recurrence=dict(r_max=args.r_max))
        B, T = 2, 16
    else:
        cfg = GPTConfig.from_preset("cpu-small", recurrence=dict(r_max=args.r_max))
        B, T = 2, 64
    baseline_r_max = args.baseline_r_max or (min(2, args.r_max) if args.quick else args.r_max)
    baseline_backend = args.baseline_backend or ("eager" if args.quick else args.backend)
    torch.manual_seed(0)
    base = randomize_(GPT(cfg), seed=0, std=0.05)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    rs = list(range(1, args.r_max + 1))
    base.eval()
    with torch.no_grad():
        eager_logits = {r: base(x, num_recur=r) for r in rs}

    ours_model = copy.deepcopy(base)
    ours_model.compile_recurrence(backend=args.backend)
    ours = run_over_r(ours_model, ours_model, x, rs, eager_logits)

    whole_model = copy.deepcopy(base)
    whole = torch.compile(whole_model, dynamic=True, backend=baseline_backend)
    baseline = run_over_r(whole_model, whole, x, rs[:baseline_r_max], eager_logits)

    emit(
        {
            "benchmark": "compile_graphs",
            "quick": args.quick,
            "backend": args.backend,
            "config": {
                **{k: getattr(cfg, k) for k in ("n_embd", "n_head", "n_prelude", "n_recur", "n_coda", "vocab_size")},
                "bptt_k": cfg.recurrence.bptt_k,
            },
            "batch": B,
            "seq": T,
            "r_values": rs,
            "dynamo_recompile_limit": int(torch._dynamo.config.recompile_limit),
            "compile_recurrence": ours,
            "whole_forward_dynamic": {"backend": baseline_backend, "r_values": rs[:baseline_r_max], **baseline},
            "notes": NOTES,
            "goal": "compile_recurrence.unique_graphs <= 2",
            "goal_met": ours["unique_graphs"] <= 2,
            "env": environment(),
        }
    )


if __name__ == "__main__":
    main()
