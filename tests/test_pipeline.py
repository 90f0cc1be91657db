"""Pipelines: config validation, the one training loop (resume equivalence, corrupt checkpoints) without Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from checkpoints import Storage, fetch_latest_valid, list_checkpoints, load_checkpoint
from pipelines.config import ConfigError, PipelineConfig, StageConfig
from pipelines.dag import _train_tokenizer, selected_stages, stage_hashes
from pipelines.train_loop import LocalSession, StageJob, lr_multiplier, run_stage
from recursive_model.recurrence import ExitRule, RecurrenceSampling
from rnc.cli import main as rnc


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
        (dict(stages=[dict(name="pretrain", stepz=5)]), r"stages\[0\].stepz: unknown field; known: \[.*'steps'"),
        (dict(bogus=1), "bogus"),
        (dict(stages=[dict(name="finetune")]), r"stages\[0\].name='finetune'"),
        (dict(model={"preset": "tiny", "recurrence": {"bptt_k": 0}}), r"model: RecurrenceSampling.bptt_k=0"),
        (dict(stages=[dict(name="pretrain", recurrence={"sigma": 9.0})]),
         r"stages\[0\].recurrence: RecurrenceSampling.sigma=9.0 is invalid; allowed a number in \(0, 4.0\]"),
        (dict(stages=[dict(name="pretrain", recurrence={"r_maxx": 2})]),
         r"stages\[0\].recurrence: unknown RecurrenceSampling field\(s\) \['r_maxx'\]; known: \['mean', 'sigma'"),
        (dict(stages=[dict(name="pretrain", steps="5")]), r"stages\[0\].steps='5' is invalid: Input should be a valid"),
        (dict(stages=[dict(name="pretrain"), dict(name="pretrain")]), r"stages: \['pretrain', 'pretrain'\] is invalid"),
        (dict(scaling=dict(use_gpu=1)), r"scaling.use_gpu=1 is invalid: Input should be a valid boolean"),
        (dict(wandb=dict(mode="loud")), r"wandb.mode='loud' is invalid: Input should be 'online', 'offline' or"),
        (dict(run_name="a/b"), r"run_name: 'a/b' is invalid; allowed: a non-empty name without '/'"),
        (dict(eval=dict(adaptive="entropy:1e-3")), r"eval.adaptive: ExitRule.criterion='entropy'"),
        (dict(eval=dict(adaptive="kl")), r"eval.adaptive: exit rule 'kl' is not criterion:threshold"),
        (dict(eval=dict(recurrences=[0, 2])), "eval.recurrences"),
        (dict(storage={"uri": "gs://bucket/x"}), "scheme 'gs'"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig.from_preset("tiny", **overrides)


def test_stage_recurrence_is_the_models_unless_set_and_a_partial_one_completes_from_the_model():
    cfg = PipelineConfig.from_preset("tiny", stages=[dict(name="pretrain", recurrence={"bptt_k": 1}), dict(name="sft")])
    model = cfg.gpt_config().recurrence
    assert cfg.stage("pretrain").recurrence == RecurrenceSampling(mean=model.mean, sigma=model.sigma,
                                                                  r_max=model.r_max, bptt_k=1)
    assert cfg.stage("sft").recurrence is None and cfg.stage("sft").recurrence_for(cfg.gpt_config()) == model
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg  # the completed form round-trips


def test_eval_adaptive_is_parsed_once_into_an_exit_rule(tmp_path):
    cfg = PipelineConfig.from_preset("tiny", eval=dict(adaptive="kl:5e-4:2"))
    assert cfg.eval.adaptive == ExitRule(criterion="kl", threshold=5e-4, min_recur=2)
    path = tmp_path / "p.yaml"
    path.write_text(cfg.to_yaml())
    assert PipelineConfig.from_yaml(path).eval.adaptive == cfg.eval.adaptive


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


def test_a_stage_trains_with_its_own_recurrence_and_its_checkpoint_records_it(trained_tokenizer_storage):
    """bptt_k set on the stage trains exactly as the same bptt_k set on the model, unlike the model's own bptt_k;
    the stage's checkpoint records the recurrence it was trained with."""
    base = trained_tokenizer_storage
    stage_k1 = PipelineConfig.from_dict({**base.to_dict(), "stages": [{**base.stage("pretrain").to_dict(),
                                                                         "recurrence": {"bptt_k": 1}}]})
    model_k1 = PipelineConfig.from_dict({**base.to_dict(), "model": {**base.model, "recurrence": {"bptt_k": 1}}})
    assert base.gpt_config().recurrence.bptt_k == 2 and stage_k1.gpt_config() == base.gpt_config()
    weights = {}
    for name, cfg in (("stage-k1", stage_k1), ("model-k1", model_k1), ("model-k2", base)):
        job = job_for(cfg, "pretrain", run_name=name)
        run_stage(job, LocalSession(job))
        weights[name] = final_weights(cfg, job)
        newest = list_checkpoints(Storage(cfg.storage), job.stage_path)[0][1]
        saved = load_checkpoint(newest).config
        assert saved.recurrence == cfg.stage("pretrain").recurrence_for(cfg.gpt_config())
        assert saved.decode == cfg.gpt_config().decode
    for k in weights["stage-k1"]:
        torch.testing.assert_close(weights["stage-k1"][k], weights["model-k1"][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(weights["stage-k1"][k], weights["model-k2"][k]) for k in weights["stage-k1"])


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
