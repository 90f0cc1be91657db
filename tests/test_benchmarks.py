"""Benchmark scripts: each runs with --quick in a subprocess and prints one JSON object.

Only structure and non-time facts are asserted (graph counts, memory ratios, token equality); times never are. The
scripts start together so the file stays well under a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK_RUNS = {
    "iso_flop": [],
    "decode": [],
    "compile_graphs": ["--backend", "aot_eager"],
    "bptt_memory": [],
    "gpu": [],
    "continuous_batching": [],
    "depth_pays": ["--problems", "12"],
}
# Scripts that promise to run where only torch, tiktoken, safetensors and numpy are installed (a lent GPU box): their
# quick run starts with these imports blocked, so importing any of them, at load time or later, fails the run.
TORCH_ONLY = {"gpu"}
BLOCKED_IMPORTS = (
    "ray",
    "boto3",
    "botocore",
    "pyarrow",
    "pydantic",
    "wandb",
    "rustbpe",
    "datasets",
    "fastapi",
    "pipelines",
    "serve",
)
BLOCK_THEN_RUN = (
    "import runpy, sys\n"
    f"for name in {BLOCKED_IMPORTS!r}:\n"
    "    sys.modules[name] = None  # `import name` now raises ImportError\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def quick_command(name: str, extra: list[str]) -> list[str]:
    script = [str(ROOT / "benchmarks" / f"{name}.py"), "--quick", *extra]
    return [sys.executable, "-c", BLOCK_THEN_RUN, *script] if name in TORCH_ONLY else [sys.executable, *script]


@pytest.fixture(scope="module")
def outputs() -> dict[str, dict]:
    """Start every quick run at once (one torch thread each), then parse each one's stdout as JSON."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    procs = {
        name: subprocess.Popen(
            quick_command(name, extra),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, extra in QUICK_RUNS.items()
    }
    try:
        finished = {name: proc.communicate(timeout=600) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, (_, stderr) in finished.items():
        assert procs[name].returncode == 0, f"{name} --quick failed:\n{stderr[-4000:]}"
    return {name: json.loads(stdout) for name, (stdout, _) in finished.items()}


def test_every_script_prints_one_json_object_with_its_name(outputs):
    for name, out in outputs.items():
        assert out["benchmark"] == name and out["quick"] is True
        assert {"goal", "goal_met", "env"} <= set(out)


def test_iso_flop_structure_and_accounting(outputs):
    out = outputs["iso_flop"]
    v = out["variants"]
    assert set(v) == {"baseline", "recursive_r4", "recursive_rpoi", "recursive_r4_k2"}
    assert all(x["tokens_per_s"] > 0 and x["params"] > 0 for x in v.values())
    assert v["baseline"]["effective_depth"] == v["recursive_r4"]["effective_depth"] == 20
    assert v["recursive_r4"]["params"] < v["baseline"]["params"]  # 8 distinct layers instead of 20
    # iso-FLOP: same depth, the adapter adds a little; truncating to k=2 removes backward work
    assert 1.0 <= out["ratios_vs_baseline"]["recursive_r4"]["flops_per_token_ratio"] < 1.2
    assert v["recursive_r4_k2"]["flops_per_token"] < v["recursive_r4"]["flops_per_token"]
    assert v["recursive_r4"]["r_timed_steps"] == [4] * len(v["recursive_r4"]["r_timed_steps"])
    assert all(1 <= r <= out["shape"]["r_max"] for r in v["recursive_rpoi"]["r_timed_steps"])
    assert isinstance(out["ratio_tokens_per_s_recursive_r4"], float)


def test_decode_cached_equals_recompute_and_cache_memory_ordering(outputs):
    out = outputs["decode"]
    assert out["greedy_tokens_match"] is True  # exact cache (eager and compiled) = full forward, token for token
    assert set(out["tokens_per_s"]) == {"cached", "cached_compiled", "recompute"}
    assert out["speedup_cached_vs_recompute"] > 0 and out["speedup_eager_cached_vs_recompute"] > 0
    for mem, cfg in ((out["kv_cache_memory"], out["config"]), (out["kv_cache_memory_d20_recursive"], None)):
        for r in (4, 8):
            b = mem[f"r{r}"]["bytes"]
            assert b["final"] < b["ring:2"] < b["exact"]
            if cfg is not None:  # final keeps one recurrent slot instead of r
                once = cfg["n_prelude"] + cfg["n_coda"]
                assert mem[f"r{r}"]["ratio_to_exact"]["final"] == pytest.approx(
                    (once + cfg["n_recur"]) / (once + r * cfg["n_recur"])
                )
        assert mem["r8"]["bytes"]["final"] == mem["r4"]["bytes"]["final"]  # independent of r
        assert mem["r8"]["bytes"]["exact"] > mem["r4"]["bytes"]["exact"]


def test_compile_recurrence_builds_at_most_two_graphs(outputs):
    out = outputs["compile_graphs"]
    ours, whole = out["compile_recurrence"], out["whole_forward_dynamic"]
    assert out["r_values"] == list(range(1, 17))
    assert ours["unique_graphs"] <= 2 and ours["recompile_limit_hits"] == 0 and ours["graph_breaks"] == 0
    assert ours["max_abs_diff_vs_eager"] < 1e-4
    assert whole["unique_graphs"] > ours["unique_graphs"]  # the unrolled forward recompiles per r
    assert whole["max_abs_diff_vs_eager"] < 1e-4


def test_bptt_memory_is_flat_in_r_with_truncation(outputs):
    out = outputs["bptt_memory"]
    assert "saved_tensors_hooks" in out["method"]
    assert out["ratio_r16_vs_r4_bptt_k4"] <= 1.3
    assert out["ratio_r16_vs_r4_full_backprop"] > 2  # contrast: full backprop stores every recurrence
    k4 = out["results"]["bptt_k4"]
    assert k4["r4"]["saved_bytes"] > k4["r4"]["saved_bytes_recurrence"] > 0


# ---------------------------------------------------------------------------------------------------- gpu.py
def test_import_blocker_really_blocks():
    """The torch-only promise below is only as good as the blocker: `import ray` must fail under it."""
    blocked_import = BLOCK_THEN_RUN.split("sys.argv")[0] + "import ray\n"
    proc = subprocess.run([sys.executable, "-c", blocked_import], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr


def test_gpu_quick_runs_torch_only_and_reports_every_figure(outputs):
    out = outputs["gpu"]  # the run itself had ray, boto3, pyarrow, pydantic, wandb, pipelines, ... blocked
    assert out["figures_claimed"] is False and out["goal_met"] is None and out["device"] == "cpu"
    variants = out["training"]["variants"]
    assert set(variants) == {"d20_recursive_r4", "d20_recursive_rpoi", "d20"}
    for v in variants.values():
        assert v["tokens_per_s"] > 0 and v["loss_finite"] and 0 < v["mfu"] < 1
        assert v["batch_tried_eager"] == v["batch_tried_compiled"] == [v["batch"]] == [out["sizes"]["start_batch"]]
        # each optimizer step accumulates micro-batches up to step_sequences (2 x 2 in the quick run)
        assert v["grad_accum"] == 2 and v["tokens_per_step"] == out["sizes"]["step_sequences"] * v["seq"]
        assert v["flops_per_token"] > 0 and v["peak_memory_bytes"] is None  # CUDA-only figure
        assert v["optimizer"] == "muon + adamw" and v["autocast"] == "bfloat16" and v["dynamo"]["graph_breaks"] == 0
    r4, rpoi, d20 = variants["d20_recursive_r4"], variants["d20_recursive_rpoi"], variants["d20"]
    r_max = out["training"]["recurrence"]["r_max"]
    assert r4["r_timed_steps"] == [4] * r4["timed_steps"] and d20["r_timed_steps"] is None
    assert all(1 <= r <= r_max for r in rpoi["r_timed_steps"])
    assert r4["params"] == rpoi["params"] < d20["params"]  # one model for both schedules; 8 distinct layers vs 20
    assert "compile_recurrence" in r4["compile"] and "compile_recurrence" not in d20["compile"]
    assert 1.0 <= r4["flops_per_token"] / d20["flops_per_token"] < 1.2  # same effective depth, plus the adapter
    for name, ratio in out["training"]["ratios_vs_d20"].items():
        assert ratio["tokens_per_s_ratio"] == pytest.approx(variants[name]["tokens_per_s"] / d20["tokens_per_s"])
    decode = out["decode"]
    assert set(decode["d20_recursive"]) >= {f"{s}_batch{b}" for s in ("exact", "ring:2", "final") for b in (1, 32)}
    assert set(decode["d20"]) >= {"exact_batch1", "exact_batch32"}
    for key in ("exact_batch1", "ring:2_batch32", "final_batch32"):
        d = decode["d20_recursive"][key]
        batch = int(key.rsplit("batch", 1)[1])
        assert d["tokens_per_s"] > 0 and 1 <= d["tokens_per_row_min"] <= d["tokens_per_row_max"]
        assert d["generated_tokens"] >= batch
    batching = out["continuous_batching"]
    assert batching["status"] in {"measured", "not available"}
    if batching["status"] == "measured":
        assert batching["requests"] == out["sizes"]["batching_requests"] and batching["generated_tokens"] > 0
        assert 1 <= batching["mean_recur"] <= batching["num_recur_range"][1]


def test_largest_batch_halves_on_out_of_memory():
    from benchmarks.gpu import largest_batch

    def fits(batch: int) -> None:
        if batch > 5:
            raise torch.OutOfMemoryError(f"batch {batch} does not fit")

    assert largest_batch(fits, 32) == (4, [32, 16, 8, 4])
    with pytest.raises(RuntimeError, match=r"no batch fits, tried \[2, 1\]"):
        largest_batch(lambda batch: fits(batch + 10), 2)


def test_gpu_benchmark_trains_with_the_d20_pretrain_optimizer():
    """benchmarks/gpu.py cannot import pipelines (Ray); its optimizer settings must stay the d20 pretrain stage's."""
    from benchmarks.gpu import D20_PRETRAIN_OPTIMIZER, D20_PRETRAIN_SEQUENCES, GRAD_CLIP
    from pipelines.config import PipelineConfig

    for preset in ("d20", "d20-recursive"):
        stage = PipelineConfig.from_preset(preset).stage("pretrain")
        for f in dataclasses.fields(D20_PRETRAIN_OPTIMIZER):
            assert getattr(D20_PRETRAIN_OPTIMIZER, f.name) == getattr(stage, f.name), (preset, f.name)
        assert stage.grad_clip == GRAD_CLIP and stage.batch_size * stage.grad_accum == D20_PRETRAIN_SEQUENCES


def test_byte_pair_tokenizer_has_exactly_the_model_vocabulary():
    from benchmarks.gpu import byte_pair_tokenizer

    for vocab_size in (265, 512, 65536):
        tok = byte_pair_tokenizer(vocab_size)
        assert tok.vocab_size == vocab_size and tok.encode_special("<|output_end|>") == vocab_size - 1
        assert tok.decode(tok.encode("ab cd")) == "ab cd"
    with pytest.raises(ValueError, match="vocab_size=100"):
        byte_pair_tokenizer(100)


def test_continuous_batching_is_batch_invariant_and_accounts_recurrences(outputs):
    out = outputs["continuous_batching"]
    assert out["batch_invariant"] is True  # traced rows == the same requests run alone (greedy, exact)
    for part in (out["adaptive_exit"], out["adaptive_exit_wide"]):
        assert 0 < part["mean_recur_ratio"] <= part["step_deepest_ratio"] <= 1
        assert part["mean_recur"] < part["r_max"]  # the exit rule fired
    trace = out["trace"]
    assert trace["continuous"]["tokens"] == trace["static"]["tokens"] > 0


def test_depth_pays_trains_three_variants_for_the_same_flops(outputs):
    out = outputs["depth_pays"]
    res = out["seeds"]["0"]
    assert set(res) == {"recipe", "iso", "unique"}
    flops = [v["train_flops"] for v in res.values()]
    assert max(flops) / min(flops) < 1.25  # steps scaled by FLOPs per token (6 recipe steps: rounding)
    assert out["flops_per_token"]["recipe"] > out["flops_per_token"]["iso"] > out["flops_per_token"]["unique"]
    for split, hops in (("eval", range(1, 5)), ("hard", range(5, 9))):
        assert list(res["recipe"][split]["accuracy"]) == ["1", "2", "4", "8", "16"]
        assert list(res["iso"][split]["accuracy"]) == ["1"]  # a plain GPT has no r
        rules = res["recipe"][split]["adaptive_rules"]  # the learned gate and the engine's heuristics
        assert set(rules) == {"learned:0.5", "kl:0.0005", "kl:0.0001", "kl:2e-05", "latent:0.0005"}
        assert "adaptive_rules" not in res["iso"][split]
        assert res["recipe"][split]["adaptive"] == rules["kl:2e-05"]  # the goals' rule: the recipe's decode exit
        for rule in rules.values():
            per_hop = rule["mean_recur_per_hop"]
            assert set(per_hop) <= {str(h) for h in hops} and all(1 <= r <= 16 for r in per_hop.values())
            assert min(per_hop.values()) <= rule["mean_recur"] <= max(per_hop.values())
        assert all(0 <= a <= 1 for a in res["recipe"][split]["accuracy"].values())
    assert set(out["checks"]) >= {"hard_r16_minus_iso_ge_15pt", "hop8_more_recurrences_than_hop2"}
    assert out["goal_met"] == all(out["checks"].values())
    assert set(out["exit_rules"]) == set(rules)  # goal 3 per exit rule; the default's is the one in `checks`
    assert out["exit_rules"]["kl:2e-05"]["checks"].items() <= out["checks"].items()
