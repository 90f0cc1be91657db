"""Sweeps: sweep-file validation and results (fast, no Ray), then Ray Tune sweeps on the session's local Ray cluster
with storage on the loopback S3 server: ASHA early stopping, results in S3, kill + resume, best-config export."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from checkpoints import Storage, fetch_checkpoint, list_checkpoints
from pipelines.config import ConfigError, PipelineConfig
from pipelines.dag import _train_tokenizer, run_pipeline
from pipelines.sweep import (
    DIVERGED_BPB,
    ObjectiveSpec,
    SweepSpec,
)
from pipelines.sweep_results import (
    TrialRow,
    best_config,
    plot_objective,
    results_json,
    results_markdown,
)
from pipelines.tune import SweepPaths, run_sweep, run_trial, stored_trials, trial_config
from rnc.cli import main as rnc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def sweep_dict(storage_uri: str = "/tmp/unused", **overrides) -> dict:
    """A valid tiny sweep (as parsed from YAML); overrides replace top-level keys."""
    d = {
        "name": "t",
        "base": {"preset": "tiny", "storage": {"uri": storage_uri}, "wandb": {"mode": "disabled"}},
        "space": {"model.recurrence.sigma": {"grid": [0.25, 1.0]}, "recurrence.bptt_k": {"grid": [1, 2]}},
        "objective": {"recurrences": [1, 2]},
        "scheduler": {"type": "asha", "grace_period": 3, "reduction_factor": 2},
    }
    d.update(overrides)
    return d


# ------------------------------------------------------------------------------------------- validation (fast)
@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("sweep-*.yaml")), ids=lambda p: p.name)
def test_example_sweep_files_validate(path):
    spec = SweepSpec.from_yaml(path)
    assert spec.space and spec.stages[0] == "pretrain"
    assert set(spec.param_space()) == set(spec.space)
    # round trip through the stored form (what --resume reads back)
    again = SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.to_dict() == spec.to_dict()


def _with(**kw):
    return kw


BAD_SWEEPS = [
    (_with(space={"model.recurrence.sgma": {"grid": [0.5]}}),
     r"space\['model.recurrence.sgma'\]: unknown field 'sgma' in model.recurrence.*did you mean 'sigma'"),
    (_with(space={"model.recurence.sigma": {"grid": [0.5]}}), r"unknown field 'recurence' in model.*'recurrence'"),
    (_with(space={"model.recurrence": {"grid": [0.5]}}),
     r"model.recurrence is a group of fields.*model.recurrence.sigma"),
    (_with(space={"model.n_embd.x": {"grid": [1]}}), r"model.n_embd is a single value; it has no field 'x'"),
    (_with(space={"stages.eval.lr": {"grid": [0.01]}}), r"space\['stages.eval.lr'\]: expected stages.<name>.<field>"),
    (_with(space={"lrr": {"grid": [0.01]}}), r"space\['lrr'\]: unknown field path"),
    (_with(space={}), "space is empty"),
    (_with(spaces={"lr": {"grid": [0.01]}}), r"spaces: unknown field; known: \[.*'space'"),
    (_with(space={"recurrence.bptt_k": {"grid": [2, 8]}}), r"bptt_k=8 > r_max=4 in stage 'pretrain'"),
    (_with(space={"model.recurrence.r_max": {"grid": [2, 4]}, "recurrence.bptt_k": {"grid": [3]}}),
     r"combination \{'model.recurrence.r_max': 2, 'recurrence.bptt_k': 3\} gives recurrence.bptt_k=3 > r_max=2"),
    (_with(space={"model.recurrence.sigma": {"uniform": [0.0, 1.0]}}),
     r"model: RecurrenceSampling.sigma=0.0 is invalid; allowed a number in \(0, 4.0\]"),
    (_with(space={"recurrence.sigma": {"grid": [0.5, -1.0]}}),
     r"stages\[0\].recurrence: RecurrenceSampling.sigma=-1.0"),
    (_with(space={"recurrence.bptt_k": {"uniform": [1, 3]}}),
     r"space\['recurrence.bptt_k'\]: recurrence.bptt_k is an integer field"),
    (_with(space={"lr": {"normal": [0, 1]}}), r"space\['lr'\]: unknown primitive 'normal'"),
    (_with(space={"lr": {"loguniform": [0, 1]}}), r"space\['lr'\].loguniform: low=0 must be > 0"),
    (_with(space={"lr": {"grid": [0.1, 20]}}), r"stages\[0\].lr=20"),
    (_with(space={"sft.lr": {"grid": [0.01]}}), r"space\['sft.lr'\]: stage 'sft' is not trained by this sweep"),
    (_with(space={"model.vocab_size": {"grid": [300]}}), "cannot be swept"),
    (_with(space={"steps": {"grid": [3, 6]}}), r"space\['steps'\]: steps cannot be swept"),
    (_with(search_alg="optuna"), r"search_alg.type='optuna' needs the Python package 'optuna'"),
    (_with(scheduler={"type": "asha", "grace_period": 9}), r"scheduler.grace_period=9 is invalid"),
    (_with(scheduler={"type": "asha", "grace": 3}), r"scheduler.grace: unknown field; known: \['grace_period'"),
    (_with(scheduler={"type": "asha", "reduction_factor": 1}), r"scheduler.reduction_factor=1 is invalid"),
    (_with(objective={"recurrences": [1, 1]}), r"objective.recurrences=\[1, 1\] has duplicates"),
    (_with(objective={"recurrences": [1, 2], "combine": "weighted", "weights": [1]}), r"objective.weights=\[1.0\]"),
    (_with(objective={"recurrences": []}), r"objective.recurrences=\[\] is invalid"),
    (_with(objective={"recurrences": [1, 2], "combine": "median"}), r"objective.combine='median' is invalid"),
    (_with(stage="sft"), "the chain must start with pretrain"),
    (_with(stage=["pretrain", "eval"]), r"stage: 'eval' is not configured"),
    (_with(trial_runner="thread"), r"trial_runner='thread' is invalid"),
    (_with(trial_resources={"CPU": 0}), r"trial_resources.CPU=0.0 must be > 0"),
    (_with(num_samples=0), r"num_samples=0 is invalid"),
]


@pytest.mark.parametrize("overrides,message", BAD_SWEEPS, ids=[m[:40] for _, m in BAD_SWEEPS])
def test_bad_sweep_is_a_clear_error_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        SweepSpec.from_dict(sweep_dict(**overrides))


def test_model_recurrence_replaced_by_a_stage_recurrence_is_refused():
    base = {"preset": "tiny", "stages": [{"name": "pretrain", "recurrence": {"sigma": 0.5}}]}
    with pytest.raises(ConfigError, match=r"model.recurrence.sigma'\] has no effect: base stage 'pretrain' sets its "
                                          r"own recurrence.*sweep 'stages.pretrain.recurrence.sigma'"):
        SweepSpec.from_dict(sweep_dict(base=base, space={"model.recurrence.sigma": {"grid": [0.25, 1.0]}}))


def test_field_paths_land_in_the_right_config_fields():
    spec = SweepSpec.from_dict(sweep_dict(stage=["pretrain", "sft"], space={
        "model.recurrence.sigma": {"grid": [0.3]}, "recurrence.bptt_k": {"grid": [1]},
        "sft.lr": {"loguniform": ["1e-4", "1e-3"]}, "stages.pretrain.recurrence.mean": {"choice": [3.0]},
        "n_embd": {"choice": [64]}, "model.decode.num_recur": {"choice": [3]}, "seed": {"randint": [1, 5]}}))
    cfg = spec.candidate_config({"model.recurrence.sigma": 0.3, "recurrence.bptt_k": 1, "sft.lr": 5e-4,
                                 "stages.pretrain.recurrence.mean": 3.0, "n_embd": 64, "model.decode.num_recur": 3,
                                 "seed": 3})
    model = cfg.gpt_config()
    tiny = PipelineConfig.from_preset("tiny").gpt_config()
    assert model.recurrence == dataclasses.replace(tiny.recurrence, sigma=0.3) and cfg.seed == 3
    assert model.n_embd == 64 and model.decode.num_recur == 3  # a bare model field; a nested one
    # A bare stage path reaches every trained stage; the rest of its recurrence is the (swept) model's.
    assert cfg.stage("sft").recurrence == dataclasses.replace(model.recurrence, bptt_k=1)
    assert cfg.stage("pretrain").recurrence == dataclasses.replace(model.recurrence, bptt_k=1, mean=3.0)
    assert cfg.stage("sft").lr == 5e-4 and cfg.stage("pretrain").lr == PipelineConfig.from_preset("tiny").stage(
        "pretrain").lr
    assert cfg.stage("mid").recurrence is None  # not trained by this sweep: untouched, the model's
    assert cfg.stage("pretrain").eval_recur == [1, 2] and spec.total_steps == 12


def test_objective_combines_and_scores_diverged_runs_worst():
    m = {"val_bpb_r1": 3.0, "val_bpb_r2": 2.0, "val_bpb_r4": 1.0}
    score = lambda **kw: ObjectiveSpec(recurrences=[1, 2, 4], **kw).score(m)["objective"]  # noqa: E731
    assert score() == pytest.approx(2.0)
    assert score(combine="max") == 3.0 and score(combine="last") == 1.0
    assert score(combine="weighted", weights=[0, 1, 3]) == pytest.approx((2 + 3) / 4)
    assert ObjectiveSpec(recurrences=[1, 4]).score(m)["bpb_gain"] == 2.0
    assert ObjectiveSpec(recurrences=[1, 8]).score(m) is None  # no r=8 eval in this report: not an eval step
    assert ObjectiveSpec(recurrences=[1]).score({"val_bpb_r1": math.nan})["objective"] == DIVERGED_BPB


def _rows() -> list[TrialRow]:
    def row(tid, sigma, obj, steps, status="TERMINATED"):
        params = {"model.recurrence.sigma": sigma, "recurrence.bptt_k": 1}
        return TrialRow(tid, status, params, obj, {1: obj, 2: obj}, 0.01, steps, 6, 2, None)
    return [row("a", 0.25, 5.9, 6), row("b", 1.0, 5.7, 6), row("c", 0.5, 6.1, 3), row("d", 0.75, None, 0, "ERROR")]


def test_results_table_plot_and_best_config(tmp_path):
    spec = SweepSpec.from_dict(sweep_dict(str(tmp_path)))
    rows = _rows()
    md = results_markdown(spec, rows)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[1] for ln in lines[1:]] == ["b", "a", "c", "d"]  # finished by objective, then the rest
    assert "| 3/6 | yes |" in lines[3] and "| 6/6 | no |" in lines[1]
    data = json.loads(results_json(spec, rows))
    assert data["best_trial"] == "b" and data["trials"][2]["stopped_early"] is True
    plot_objective(spec, rows, tmp_path / "objective.png")
    assert (tmp_path / "objective.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "best.yaml"
    out.write_text(best_config(spec, rows[1]).to_yaml())
    cfg = PipelineConfig.from_yaml(out)  # what `rnc pipeline run --config best.yaml` does
    assert cfg.run_name == "t-best" and cfg.gpt_config().recurrence.sigma == 1.0
    assert cfg.stage("pretrain").recurrence.bptt_k == 1


def test_cli_refuses_a_bad_sweep_file_before_any_trial(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(sweep_dict(str(tmp_path), space={"recurrence.bptt_k": {"grid": [1, 16]}})))
    assert rnc(["tune", "--config", str(bad)]) == 2
    assert "bptt_k=16 > r_max=4" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # nothing written to storage
    assert rnc(["tune"]) == 2
    assert "--config" in capsys.readouterr().err


# -------------------------------------------------------------------------- the trial without Ray (fast-ish)
@pytest.fixture(scope="module")
def tokenized_sweep(tmp_path_factory) -> SweepSpec:
    """A tiny sweep in local storage with its shared tokenizer trained."""
    root = tmp_path_factory.mktemp("sweep")
    spec = SweepSpec.from_dict(sweep_dict(str(root)))
    _train_tokenizer(spec.candidate_config({}, run_name=spec.name))
    return spec


def test_function_trial_reports_eval_steps_with_objective_and_chain_offsets(tokenized_sweep, monkeypatch):
    spec = SweepSpec.from_dict({**copy.deepcopy(tokenized_sweep.to_dict()), "stage": ["pretrain", "sft"]})
    reports: list[dict] = []
    params = {"model.recurrence.sigma": 0.25, "recurrence.bptt_k": 1}
    final = run_trial(spec, params, "trial0", report_fn=reports.append)
    # tiny: eval every 3 of 6 steps per stage -> 4 Tune results; trial_step runs on across the chain
    assert [(r["stage"], r["step"], r["trial_step"]) for r in reports] == [
        ("pretrain", 3, 3), ("pretrain", 6, 6), ("sft", 3, 9), ("sft", 6, 12)]
    for r in reports:
        assert r["objective"] == pytest.approx((r["val_bpb_r1"] + r["val_bpb_r2"]) / 2)
    storage = Storage(spec.base.storage)
    paths = SweepPaths(storage, spec.name)
    assert final == storage.uri_for(paths.stage("trial0", "sft") + "/step_000006")
    assert [s for s, _ in list_checkpoints(storage, paths.stage("trial0", "pretrain"))] == [6, 3]
    cfg = trial_config(spec, {"model.recurrence.sigma": 0.25, "recurrence.bptt_k": 1}, "trial0")
    assert cfg.run_name == "t-trial0" and cfg.wandb.dir == storage.join("t", "wandb")


def test_trial_wandb_runs_share_one_group_per_sweep(tokenized_sweep, monkeypatch):
    import wandb

    from pipelines.train_loop import LocalSession, StageJob, _init_wandb

    seen: dict = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or object())
    spec = tokenized_sweep
    cfg = trial_config(spec, {"model.recurrence.sigma": 0.25, "recurrence.bptt_k": 1}, "abc_00001")
    cfg.wandb.mode = "offline"
    storage = Storage(cfg.storage)
    job = StageJob(cfg, "pretrain", storage.join(spec.name, "tokenizer"), storage.join(spec.name, "x"),
                   wandb_group=spec.name)
    _init_wandb(job, LocalSession(job))
    assert seen["group"] == "t" and seen["name"] == "t-abc_00001-pretrain"


# --------------------------------------------------------------------------------------- on Ray + S3 (slow)
def s3_sweep(bucket, name: str, **overrides) -> dict:
    d = sweep_dict(f"s3://{bucket.name}/sweeps", name=name, **overrides)
    d["base"]["storage"].update(endpoint_url=bucket.endpoint_url, retries=4, backoff_s=0.05)
    return d


@pytest.mark.slow
def test_asha_sweep_on_s3_stops_the_absurd_lr_and_its_best_config_runs(ray_cluster, s3_bucket, tmp_path):
    # Sequential trials in grid order: the absurd lr reaches the first rung last and is worse than the median there.
    spec = SweepSpec.from_dict(s3_sweep(s3_bucket, "asha", space={"lr": {"grid": [3e-3, 1e-2, 2e-2, 9.0]}},
                                        max_concurrent_trials=1))
    outcome = run_sweep(spec)
    rows = {r.params["lr"]: r for r in outcome.rows}
    assert len(rows) == 4 and all(r.status == "TERMINATED" for r in rows.values())
    assert rows[9.0].stopped_early and rows[9.0].steps == 3
    assert sum(not r.stopped_early for r in rows.values()) >= 1
    assert outcome.best is not None and outcome.best.params["lr"] != 9.0

    storage = Storage(spec.base.storage)
    paths = SweepPaths(storage, "asha")
    for f in ("results.md", "results.json", "objective.png", "best.yaml"):
        assert storage.exists(f"{paths.results}/{f}"), f
    assert outcome.results_uri == f"s3://{s3_bucket.name}/sweeps/asha/results"
    assert storage.read_json(f"{paths.results}/results.json")["best_trial"] == outcome.best.trial_id
    assert len(stored_trials(storage, "asha")) == 4  # the Tune experiment state is in S3 too
    fetch_checkpoint(outcome.best.checkpoint, storage=storage, cache_dir=tmp_path)  # complete and verified
    assert outcome.best.checkpoint.endswith("/pretrain/step_000006")

    best = PipelineConfig.from_dict(yaml.safe_load(outcome.best_yaml))
    assert best.stage("pretrain").lr == outcome.best.params["lr"]
    result = run_pipeline(best, stages=["tokenizer", "pretrain"])
    assert result.stages["pretrain"]["status"] == "finished"
    assert result.stages["pretrain"]["checkpoint"].startswith(f"s3://{s3_bucket.name}/sweeps/asha-best/pretrain/")


@pytest.mark.slow
def test_driver_killed_mid_sweep_then_resume_runs_only_the_rest(ray_cluster, s3_bucket, tmp_path):
    d = s3_sweep(s3_bucket, "killed", space={"model.recurrence.sigma": {"grid": [0.25, 0.5, 0.75, 1.0]}},
                 max_concurrent_trials=1, scheduler={"type": "asha", "grace_period": 6})  # restored, never stops
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(d))
    spec = SweepSpec.from_yaml(sweep_file)
    storage = Storage(spec.base.storage)
    # The experiment state is saved every second (Tune's default: every 10 s), so a finished trial is on record soon.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rnc", "tune", "--config", str(sweep_file)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    finished: dict[str, dict] = {}
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not finished:
            finished = {t["trial_id"]: t["last_result"] for t in stored_trials(storage, "killed")
                        if t["status"] == "TERMINATED"}
            time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    assert finished, f"no trial finished before the deadline; driver log:\n{log.read_text()[-3000:]}"
    assert len(finished) < 4, "the sweep finished before the driver could be killed"

    export = tmp_path / "best.yaml"
    assert rnc(["tune", "--resume", "killed", "--storage", f"s3://{s3_bucket.name}/sweeps",
                "--storage-endpoint", s3_bucket.endpoint_url, "--export", str(export)]) == 0
    after = {t["trial_id"]: t for t in stored_trials(storage, "killed")}
    assert len(after) == 4 and all(t["status"] == "TERMINATED" for t in after.values())
    assert all(t["last_result"]["trial_step"] == 6 for t in after.values())
    for trial_id, last in finished.items():  # not rerun: the very same last result, same number of reports
        assert after[trial_id]["last_result"]["timestamp"] == last["timestamp"]
        assert after[trial_id]["last_result"]["training_iteration"] == last["training_iteration"]
    assert PipelineConfig.from_yaml(export).run_name == "killed-best"


@pytest.mark.slow
def test_train_runner_trial_is_a_ray_train_run_reporting_to_tune(ray_cluster, s3_bucket):
    spec = SweepSpec.from_dict(s3_sweep(s3_bucket, "train", space={"recurrence.sigma": {"grid": [0.5]}},
                                        trial_runner="train", scheduler={"type": "fifo"}))
    outcome = run_sweep(spec)
    (row,) = outcome.rows
    assert row.status == "TERMINATED" and row.steps == 6 and not row.stopped_early
    assert set(row.val_bpb) == {1, 2} and row.reports == 2  # the two eval steps, forwarded by the callback
    storage = Storage(spec.base.storage)
    stage_path = SweepPaths(storage, "train").stage(row.trial_id, "pretrain")
    assert [s for s, _ in list_checkpoints(storage, stage_path)] == [6, 3]
    # a Ray Train run: its controller's state sits in the stage directory, as in the pipeline DAG
    assert storage.exists(f"{stage_path}/checkpoint_manager_snapshot.json")
