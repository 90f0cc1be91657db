"""Ray Train overhead: training tokens/s of the same stage under Ray Train (1 worker) vs the same loop in-process.

Both sides run `pipelines.train_loop.run_stage` — the one training loop — on the same model, data, steps and thread
count; only the session differs (RaySession inside a TorchTrainer worker vs LocalSession). Runs alternate A, B, A, B
and medians are compared. Two ratios: steady-state tokens/s (the loop's own metric, training time only) and end-to-end
wall time of the stage (Ray includes worker-group start-up). Prints one JSON object; asserts nothing about time.

    python benchmarks/ray_overhead.py [--quick] [--steps N] [--repeats K]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoints import Storage, list_checkpoints  # noqa: E402
from pipelines.config import PipelineConfig  # noqa: E402
from pipelines.dag import _train_tokenizer, run_train_stage  # noqa: E402
from pipelines.train_loop import LocalSession, StageJob, run_stage  # noqa: E402


def make_config(root: str, steps: int, quick: bool) -> PipelineConfig:
    model = {"preset": "tiny", "vocab_size": 300} if quick else {"preset": "cpu-small", "vocab_size": 1024}
    stage = dict(
        name="pretrain",
        steps=steps,
        batch_size=4 if quick else 8,
        eval_every=steps,
        eval_batches=1,
        checkpoint_every=steps,
        log_every=steps,
        eval_recur=[2],
        warmup_steps=1,
    )
    return PipelineConfig.from_preset(
        "tiny",
        model=model,
        stages=[stage],
        storage={"uri": root},
        tokenizer={"max_chars": 300_000},
        wandb={"mode": "disabled"},
        scaling={"num_workers": 1, "cpus_per_worker": 2.0},
        max_failures=0,
    )


def run_local(cfg: PipelineConfig, run: str) -> tuple[float, float]:
    st = Storage(cfg.storage)
    job = StageJob(cfg, "pretrain", st.join(cfg.run_name, "tokenizer"), st.join(run, "pretrain"))
    t0 = time.perf_counter()
    out = run_stage(job, LocalSession(job))
    return out.metrics["tokens_per_s"], time.perf_counter() - t0


def run_ray(cfg: PipelineConfig, run: str) -> tuple[float, float]:

    st = Storage(cfg.storage)
    # run_train_stage names paths after cfg.run_name: give each repetition its own run, sharing the tokenizer.
    shared = st.join(cfg.run_name, "tokenizer")
    st.upload_dir(shared, st.join(run, "tokenizer"))
    t0 = time.perf_counter()
    _, metrics = run_train_stage(cfg.replace(run_name=run), st, "pretrain", None)
    wall = time.perf_counter() - t0
    assert list_checkpoints(st, st.join(run, "pretrain"))
    return metrics["tokens_per_s"], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    steps = args.steps or (8 if args.quick else 60)
    repeats = args.repeats or (1 if args.quick else 2)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    with tempfile.TemporaryDirectory() as root:
        cfg = make_config(root, steps, args.quick)
        _train_tokenizer(cfg)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        local, remote = [], []
        try:
            run_local(cfg, "warmup")  # one-time costs (dataset files, tokenizer caches) stay out of the comparison
            for i in range(repeats):
                local.append(run_local(cfg, f"local{i}"))
                remote.append(run_ray(cfg, f"ray{i}"))
        finally:
            ray.shutdown()
    tok_local = statistics.median(t for t, _ in local)
    tok_ray = statistics.median(t for t, _ in remote)
    wall_local = statistics.median(w for _, w in local)
    wall_ray = statistics.median(w for _, w in remote)
    print(
        json.dumps(
            {
                "benchmark": "ray_overhead",
                "model": cfg.model,
                "steps": steps,
                "repeats": repeats,
                "tokens_per_step": cfg.stages[0].batch_size * cfg.gpt_config().sequence_len,
                "local_tokens_per_s": round(tok_local, 1),
                "ray_tokens_per_s": round(tok_ray, 1),
                "ratio_tokens_per_s": round(tok_ray / tok_local, 4),
                "goal_ratio": 0.95,
                "local_stage_wall_s": round(wall_local, 2),
                "ray_stage_wall_s": round(wall_ray, 2),
                "ratio_wall": round(wall_local / wall_ray, 4),
                "note": "tokens/s counts training steps only (the loop's metric); wall includes Ray worker start-up",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
