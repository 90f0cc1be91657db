"""The pipeline DAG: tokenizer -> pretrain -> mid -> sft -> eval, chained from a plain driver.

Each training stage is a Ray Train `TorchTrainer` whose experiment directory is `<storage>/<run>/<stage>`; the
tokenizer and eval stages are Ray tasks. The pipeline manifest (`<storage>/<run>/pipeline.json`) records each stage's
status, config hash, final checkpoint and metrics, so running the same run name again skips finished stages (with
unchanged config) and resumes an unfinished stage from its newest valid checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from checkpoints import INFERENCE_PARTS, Storage, fetch_checkpoint, list_checkpoints, load_checkpoint

from .config import ALL_STAGES, STAGE_KINDS, ConfigError, PipelineConfig
from .manifest import PipelineManifest, config_hash
from .train_loop import StageJob, build_trainer


@dataclass
class PipelineResult:
    run_name: str
    run_uri: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> {status, checkpoint, metrics, ...}
    report_uri: str | None = None
    skipped: list[str] = field(default_factory=list)


def stage_hashes(config: PipelineConfig) -> dict[str, str]:
    """Config hash per stage, chained: a stage reruns when its own config or any upstream stage's config changes."""
    model = config.gpt_config().to_dict()
    hashes: dict[str, str] = {}
    prev = config_hash({"tokenizer": config.tokenizer.to_dict(), "vocab_size": model["vocab_size"]})
    hashes["tokenizer"] = prev
    for stage in config.stages:
        prev = config_hash({"up": prev, "stage": stage.to_dict(), "model": model, "seed": config.seed,
                            "scaling": config.scaling.to_dict()})
        hashes[stage.name] = prev
    hashes["eval"] = config_hash({"up": prev, "eval": config.eval.to_dict()})
    return hashes


def selected_stages(config: PipelineConfig, stages: list[str] | None) -> list[str]:
    """The stages to run, in DAG order; unknown or unconfigured names are an error naming them."""
    configured = ["tokenizer", *[s.name for s in sorted(config.stages, key=lambda s: STAGE_KINDS.index(s.name))],
                  "eval"]
    if not stages:
        return configured
    unknown = [s for s in stages if s not in ALL_STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; known: {list(ALL_STAGES)}")
    missing = [s for s in stages if s not in configured]
    if missing:
        raise ConfigError(f"--stages: stage(s) {missing} are not configured in this pipeline; configured: {configured}")
    return [s for s in configured if s in stages]


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address` / RAY_ADDRESS, or start a local one sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=True, log_to_driver=True)


def run_pipeline(config: PipelineConfig, stages: list[str] | None = None, address: str | None = None,
                 echo=print) -> PipelineResult:
    """Run (or resume) the pipeline; returns what each stage produced. Raises on the first failed stage."""
    storage = Storage(config.storage)
    storage.check_reachable()  # fail in seconds, before any cluster work, naming the endpoint
    wanted = selected_stages(config, stages)
    everything = selected_stages(config, None)
    hashes = stage_hashes(config)
    manifest = PipelineManifest.load(storage, config.run_name, stages=everything)
    run_root = storage.join(config.run_name)
    result = PipelineResult(config.run_name, storage.uri_for(run_root))
    ensure_ray(address)
    t0 = time.perf_counter()
    prev_checkpoint: str | None = None
    last_wanted = max(everything.index(n) for n in wanted)
    for name in everything[: last_wanted + 1]:  # stages after the last wanted one are left alone
        finished = manifest.is_finished(name, hashes[name]) and _outputs_exist(storage, manifest, name)
        if name not in wanted or finished:
            if finished:
                result.skipped.append(name)
                echo(f"== {name}: finished earlier (config unchanged), skipping")
            else:
                raise ConfigError(f"stage {name!r} must run before {wanted}: it has not finished for this config "
                                  f"(run it too, or drop --stages)")
            if name in STAGE_KINDS:
                prev_checkpoint = manifest.checkpoint_uri(name)
            result.stages[name] = _record_dict(manifest, name)
            continue
        echo(f"== {name}: starting ({time.perf_counter() - t0:.0f}s into the pipeline)")
        manifest.mark_running(name, hashes[name])
        try:
            if name == "tokenizer":
                ckpt, metrics = run_tokenizer_stage(config, storage)
            elif name == "eval":
                ckpt, metrics = run_eval_stage(config, storage, prev_checkpoint, manifest)
                result.report_uri = ckpt
            else:
                ckpt, metrics = run_train_stage(config, storage, name, prev_checkpoint)
                prev_checkpoint = ckpt
        except BaseException as exc:
            manifest.mark_failed(name, exc)
            raise
        manifest.mark_finished(name, ckpt, metrics)
        result.stages[name] = _record_dict(manifest, name)
        echo(f"== {name}: finished -> {ckpt}")
    if result.report_uri is None and manifest.stages.get("eval") and manifest.stages["eval"].status == "finished":
        result.report_uri = manifest.stages["eval"].checkpoint_uri
    return result


def _record_dict(manifest: PipelineManifest, name: str) -> dict[str, Any]:
    rec = manifest.stages[name]
    return {"status": rec.status, "checkpoint": rec.checkpoint_uri, "metrics": rec.metrics}


def _outputs_exist(storage: Storage, manifest: PipelineManifest, name: str) -> bool:
    """A finished stage counts only while its output is still in storage."""
    uri = manifest.checkpoint_uri(name)
    if uri is None:
        return False
    if name in STAGE_KINDS:
        return storage.is_complete_checkpoint(uri)
    return storage.exists(uri)


# ------------------------------------------------------------------------------------------------------ tokenizer
def _train_tokenizer(config: PipelineConfig) -> dict[str, Any]:
    """Ray task body: train BPE on the corpus and upload it to <run>/tokenizer."""
    from recursive_model import Tokenizer
    from recursive_model.corpus import iter_texts

    storage = Storage(config.storage)
    vocab = config.gpt_config().vocab_size
    t0 = time.perf_counter()
    texts = iter_texts(config.tokenizer.corpus, "train", max_chars=config.tokenizer.max_chars, max_doc_chars=10_000)
    tok = Tokenizer.train(texts, vocab_size=vocab)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        storage.upload_dir(tmp, storage.join(config.run_name, "tokenizer"))
    sample = "The recurrent block is applied r times."
    return {"vocab_size": tok.vocab_size, "train_seconds": round(seconds, 2),
            "chars_per_token": round(len(sample) / len(tok.encode(sample)), 3)}


def run_tokenizer_stage(config: PipelineConfig, storage: Storage) -> tuple[str, dict[str, Any]]:
    import ray

    task = ray.remote(num_cpus=min(1.0, config.scaling.cpus_per_worker))(_train_tokenizer)
    metrics = ray.get(task.remote(config))
    return storage.uri_for(storage.join(config.run_name, "tokenizer")), metrics


# ------------------------------------------------------------------------------------------------------ training
def run_train_stage(config: PipelineConfig, storage: Storage, name: str, init_checkpoint: str | None):
    """One TorchTrainer fit; returns (final checkpoint URI, final metrics)."""
    stage = config.stage(name)
    job = StageJob(config=config, stage=name, tokenizer_path=storage.join(config.run_name, "tokenizer"),
                   stage_path=storage.join(config.run_name, name), init_checkpoint=init_checkpoint,
                   val_source=config.tokenizer.corpus)
    result = build_trainer(job).fit()
    final = list_checkpoints(storage, job.stage_path)
    if not final or final[0][0] != stage.steps:
        raise RuntimeError(f"stage {name}: no complete checkpoint at step {stage.steps} in "
                           f"{storage.uri_for(job.stage_path)} after training")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return storage.uri_for(final[0][1]), metrics


# ---------------------------------------------------------------------------------------------------------- eval
def _evaluate(config: PipelineConfig, checkpoint_uri: str, stage_metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray task body: tasks x recurrences on the final checkpoint; writes the eval table and the report card."""
    import torch

    from recursive_model.evaluation import evaluate_model, write_outputs

    storage = Storage(config.storage)
    if config.scaling.cpus_per_worker >= 1:
        torch.set_num_threads(int(config.scaling.cpus_per_worker))
    spec = config.eval
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load_checkpoint(fetch_checkpoint(checkpoint_uri, INFERENCE_PARTS, storage=storage, cache_dir=tmp))
        report = evaluate_model(ckpt.model, ckpt.tokenizer, tasks=spec.tasks, recurrences=spec.recurrences,
                                adaptive=spec.adaptive, max_problems=spec.max_problems, max_tokens=spec.max_tokens,
                                batch_size=spec.batch_size, checkpoint=checkpoint_uri, meta=ckpt.meta)
        out = os.path.join(tmp, "eval")
        sections = {"Training stages": _stage_table(stage_metrics),
                    "Pipeline config": "```yaml\n" + config.to_yaml() + "```"}
        write_outputs(report, out, title=f"Report card: {config.run_name}", extra_sections=sections)
        dest = storage.join(config.run_name, "eval")
        storage.upload_dir(out, dest)
    chatcore = {str(key): round(report.chatcore(key), 4) for key in report.columns()}
    return {"uri": storage.uri_for(dest), "chatcore": chatcore}


def _stage_table(stage_metrics: dict[str, Any]) -> str:
    lines = ["| stage | metrics |", "|---|---|"]
    for stage, metrics in stage_metrics.items():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        lines.append(f"| {stage} | {shown} |")
    return "\n".join(lines)


def run_eval_stage(config: PipelineConfig, storage: Storage, checkpoint_uri: str | None,
                   manifest: PipelineManifest) -> tuple[str, dict[str, Any]]:
    import ray

    if checkpoint_uri is None:
        raise ConfigError("eval: no trained checkpoint to evaluate (configure at least one training stage)")
    stage_metrics = {n: r.metrics for n, r in manifest.stages.items() if n in STAGE_KINDS and r.status == "finished"}
    task = ray.remote(num_cpus=max(1.0, config.scaling.cpus_per_worker) if not config.scaling.use_gpu else 1,
                      num_gpus=1 if config.scaling.use_gpu else 0)(_evaluate)
    out = ray.get(task.remote(config, checkpoint_uri, stage_metrics))
    return out["uri"], {f"chatcore_r{k}": v for k, v in out["chatcore"].items()}
