"""Benchmark scripts: each runs with --quick in a subprocess and prints one JSON object.

Only structure and non-time facts are asserted (graph counts, memory ratios, token equality); times never are. The four
scripts start together so the file stays well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK_RUNS = {
    "iso_flop": [],
    "decode": [],
    "compile_graphs": ["--backend", "aot_eager"],
    "bptt_memory": [],
}


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
            [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", *extra],
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
    assert out["greedy_tokens_match"] is True  # exact cache = full forward, token for token
    assert set(out["tokens_per_s"]) == {"cached", "recompute"} and out["speedup_cached_vs_recompute"] > 0
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
