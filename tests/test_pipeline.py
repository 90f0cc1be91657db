"""Pipelines: config validation, the one training loop (resume equivalence, corrupt checkpoints) without Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines.cli import main as rnc
from pipelines.config import ConfigError, PipelineConfig, StageConfig
from pipelines.dag import _train_tokenizer, selected_stages, stage_hashes
from pipelines.storage import Storage
from pipelines.train_loop import (
    LocalSession,
    StageJob,
    fetch_latest_valid,
    list_checkpoints,
    lr_multiplier,
    run_stage,
)


def tiny_config(storage_uri: str, **overrides) -> PipelineConfig:
    return PipelineConfig.from_preset("tiny", storage={"uri": storage_uri}, wandb={"mode": "disabled"}, **overrides)


# --- config -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "cpu-small", "d20-recursive", "d20"])
def test_presets_validate_and_round_trip_through_yaml(preset, tmp_path):
    cfg = PipelineConfig.from_preset(preset)
    path = tmp_path / "p.yaml"
    path.write_text(cfg.to_yaml())
    assert PipelineConfig.from_yaml(path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model={"preset": "nope"}), "unknown model preset 'nope'"),
        (dict(stages=[dict(name="pretrain", steps=-5)]), r"stages\[0\].steps=-5"),
        (dict(stages=[dict(name="pretrain", stepz=5)]), r"stages\[0\].stepz"),
        (dict(bogus=1), "bogus"),
        (dict(stages=[dict(name="finetune")]), r"stages\[0\].name='finetune'"),
        (dict(model={"preset": "tiny", "bptt_k": 0}), "bptt_k"),
        (dict(eval=dict(recurrences=[0, 2])), "eval.recurrences"),
        (dict(storage={"uri": "gs://bucket/x"}), "scheme 'gs'"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig.from_preset("tiny", **overrides)


def test_unknown_pipeline_preset_and_cli_errors(capsys, tmp_path):
    with pytest.raises(ConfigError, match="unknown pipeline preset 'd99'"):
        PipelineConfig.from_preset("d99")
    assert rnc(["config", "show", "--preset", "d99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown pipeline preset 'd99'" in err[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nstages:\n  - name: pretrain\n    steps: -1\n")
    assert rnc(["config", "show", "--config", str(bad)]) == 2
    assert "stages[0].steps=-1" in capsys.readouterr().err


def test_config_show_prints_yaml_the_run_command_accepts(capsys, tmp_path):
    assert rnc(["config", "show", "--preset", "cpu-small", "--run-name", "x1"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["run_name"] == "x1" and [s["name"] for s in data["stages"]] == ["pretrain", "mid", "sft"]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert PipelineConfig.from_yaml(path).run_name == "x1"


def test_stage_selection_and_hash_chaining(tmp_path):
    cfg = tiny_config(str(tmp_path))
    assert selected_stages(cfg, None) == ["tokenizer", "pretrain", "mid", "sft", "eval"]
    assert selected_stages(cfg, ["sft", "pretrain"]) == ["pretrain", "sft"]
    with pytest.raises(ConfigError, match="unknown stage"):
        selected_stages(cfg, ["pretrain", "rlhf"])
    a = stage_hashes(cfg)
    changed = tiny_config(str(tmp_path), stages=[dict(name="pretrain", steps=7), dict(name="mid"), dict(name="sft")])
    b = stage_hashes(changed)
    assert a["tokenizer"] == b["tokenizer"]
    assert a["pretrain"] != b["pretrain"] and a["sft"] != b["sft"]  # downstream stages rerun too


def test_lr_schedule():
    stage = StageConfig(steps=100, warmup_steps=10, warmdown_frac=0.2, final_lr_frac=0.1)
    assert lr_multiplier(0, stage) == pytest.approx(0.1)
    assert lr_multiplier(50, stage) == 1.0
    assert lr_multiplier(80, stage) == pytest.approx(1.0)
    assert lr_multiplier(99, stage) == pytest.approx(0.05 + 0.95 * 0.1)


# --- the training loop without Ray ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_tokenizer_storage(tmp_path_factory):
    """A tiny pipeline storage with its tokenizer stage done."""
    root = tmp_path_factory.mktemp("pipe")
    cfg = tiny_config(str(root))
    _train_tokenizer(cfg)
    return cfg


class Interrupted(RuntimeError):
    pass


class InterruptingSession(LocalSession):
    """Dies right after the checkpoint of `stop_at` is persisted, like a node lost mid-stage."""

    def __init__(self, job, stop_at):
        super().__init__(job)
        self.stop_at = stop_at

    def report(self, metrics, checkpoint_dir, name):
        super().report(metrics, checkpoint_dir, name)
        if metrics["step"] >= self.stop_at:
            raise Interrupted(metrics["step"])


def job_for(cfg: PipelineConfig, stage: str, run_name: str | None = None) -> StageJob:
    st = Storage(cfg.storage)
    run = run_name or cfg.run_name
    return StageJob(cfg, stage, st.join(cfg.run_name, "tokenizer"), st.join(run, stage))


def final_weights(cfg: PipelineConfig, job: StageJob) -> dict[str, torch.Tensor]:
    step, path = list_checkpoints(Storage(cfg.storage), job.stage_path)[0]
    assert step == cfg.stage(job.stage).steps
    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_resumed_run_equals_uninterrupted_run(trained_tokenizer_storage, stage):
    cfg = trained_tokenizer_storage
    straight = job_for(cfg, stage, run_name=f"straight-{stage}")
    out = run_stage(straight, LocalSession(straight))
    assert out.resumed_from == 0
    resumed = job_for(cfg, stage, run_name=f"resumed-{stage}")
    with pytest.raises(Interrupted):
        run_stage(resumed, InterruptingSession(resumed, stop_at=3))
    assert [s for s, _ in list_checkpoints(Storage(cfg.storage), resumed.stage_path)] == [3]
    out = run_stage(resumed, LocalSession(resumed))
    assert out.resumed_from == 3 and out.final_step == 6
    a, b = final_weights(cfg, straight), final_weights(cfg, resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(trained_tokenizer_storage, tmp_path, caplog):
    cfg = trained_tokenizer_storage
    job = job_for(cfg, "pretrain", run_name="corrupt")
    run_stage(job, LocalSession(job))
    storage = Storage(cfg.storage)
    newest = list_checkpoints(storage, job.stage_path)[0][1]
    weights = Path(newest) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        step, _ = fetch_latest_valid(storage, job.stage_path, str(tmp_path))
    assert step == 3
    assert "model.safetensors" in caplog.text and "step_000006" in caplog.text
