"""`rnc tune`: Ray Tune sweeps over a pipeline stage, scored on validation bpb at several test-time r.

    rnc tune --config examples/sweep-tiny.yaml [--storage s3://bucket/sweeps] [--address ADDR] [--export best.yaml]
    rnc tune --resume NAME [--storage s3://bucket/sweeps]        # finished trials are not rerun

Each trial trains the sweep's stage chain with THE training loop (`train_loop.run_stage`), either inside the Tune
trial (`trial_runner: function`, a `TuneSession`; no Train start-up, for CPU laptops) or as a full Ray Train run per
stage (`trial_runner: train`, a TorchTrainer with its own workers whose reports reach Tune through
`TuneReportCallback`). Only eval reports reach Tune, each with `objective` and `trial_step` added, because Tune
requires the scheduler's metric in every result. The tokenizer is trained once per sweep and shared by all trials.

Storage layout (local folder or S3 prefix)::

    <storage>/<sweep>/sweep.json                         the sweep spec (what --resume reads) + tokenizer record
    <storage>/<sweep>/tokenizer/                         trained once, shared by every trial
    <storage>/<sweep>/tune/                              the Tune experiment (state, per-trial result.json)
    <storage>/<sweep>/trials/<trial_id>/<stage>/step_*   each trial's checkpoints (a trial restarts from them)
    <storage>/<sweep>/results/                           results.md, results.json, objective.png, best.yaml
    <storage>/<sweep>/wandb/                             offline wandb runs (local storage), one group per sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpoints import Storage, StorageConfig, list_checkpoints

from .config import ConfigError, PipelineConfig
from .dag import ensure_ray, run_tokenizer_stage
from .sweep import (
    OBJECTIVE,
    TIME_ATTR,
    ObjectiveSpec,
    SweepSpec,
)
from .sweep_results import (
    TrialRow,
    best_config,
    best_row,
    plot_objective,
    results_json,
    results_markdown,
)
from .train_loop import LocalSession, RaySession, StageJob, build_trainer, run_stage, say

SWEEP_FILE = "sweep.json"
TRAIN_DRIVER_CPU = 0.01  # a train-runner trial only waits on its TorchTrainer; Ray refuses 0


# ------------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class SweepPaths:
    """Storage paths of one sweep (see the module docstring)."""

    storage: Storage
    name: str

    @property
    def root(self) -> str:
        return self.storage.join(self.name)

    @property
    def state(self) -> str:
        return self.storage.join(self.name, SWEEP_FILE)

    @property
    def tokenizer(self) -> str:
        return self.storage.join(self.name, "tokenizer")

    @property
    def experiment(self) -> str:
        return self.storage.join(self.name, "tune")

    @property
    def results(self) -> str:
        return self.storage.join(self.name, "results")

    def stage(self, trial_id: str, stage: str) -> str:
        return self.storage.join(self.name, "trials", trial_id, stage)


# ------------------------------------------------------------------------------------------------- trial results
def trial_result(metrics: dict[str, Any], objective: ObjectiveSpec, step_offset: int, stage: str,
                 checkpoint_path: str | None = None) -> dict[str, Any] | None:
    """The Tune result for one loop report: its numeric metrics plus `objective`, `bpb_gain`, `trial_step`
    (steps since the trial started, across its chain) and `stage`; None when the report is not an eval step."""
    score = objective.score(metrics)
    if score is None:
        return None
    out: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    out.update(score)
    out[TIME_ATTR] = step_offset + int(metrics["step"])
    out["stage"] = stage
    if checkpoint_path:
        out["checkpoint_path"] = checkpoint_path
    return out


class TuneSession(LocalSession):
    """`run_stage` inside a Tune function trial: persists checkpoints like LocalSession (same layout, retrying
    upload, keep_last), exports the same Ray metrics as RaySession, and forwards eval reports to Tune."""

    # RaySession's exporter needs only `rank`, `job` and `_gauges`; reusing it keeps one set of metric names.
    _export_ray_metrics = RaySession._export_metrics

    def __init__(self, job: StageJob, objective: ObjectiveSpec, step_offset: int = 0,
                 report_fn: Callable[[dict[str, Any]], None] | None = None):
        super().__init__(job)
        self.objective, self.step_offset = objective, step_offset
        self._gauges: dict[str, Any] = {}
        self._report_fn = report_fn  # None -> ray.tune.report (tests pass a list's append)

    def report(self, metrics, checkpoint_dir, name):
        import ray

        if ray.is_initialized():  # unit tests run the trial without Ray
            self._export_ray_metrics(metrics)
        super().report(metrics, checkpoint_dir, name)  # the checkpoint is in storage before Tune may stop us
        result = trial_result(metrics, self.objective, self.step_offset, self.job.stage,
                              f"{self.job.stage_path}/{name}" if name else None)
        if result is None:
            return
        if self._report_fn is None:
            from ray import tune

            tune.report(result)
        else:
            self._report_fn(result)


def _objective_callback(objective: ObjectiveSpec, step_offset: int, stage: str):
    """A Ray Train callback forwarding eval reports (with the objective) to the Tune trial; built lazily so that
    `rnc` does not import Ray at start-up."""
    from ray.train import UserCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReportCallback(UserCallback):
        def __init__(self) -> None:
            self._forward = TuneReportCallback()  # binds to the Tune session of this trial: create it here

        def after_report(self, run_context, metrics, checkpoint):
            result = trial_result(metrics[0], objective, step_offset, stage)  # metrics[0]: rank 0 ran the eval
            if result is not None:
                self._forward.after_report(run_context, [result], checkpoint)

    return ObjectiveReportCallback()


# ----------------------------------------------------------------------------------------------------- trials
def trial_config(spec: SweepSpec, params: dict[str, Any], trial_id: str) -> PipelineConfig:
    """The pipeline config of one trial: the candidate config, named `<sweep>-<trial_id>`, wandb runs kept in the
    sweep folder (local storage), and in function mode torch threads sized to the trial's CPUs."""
    cfg = spec.candidate_config(params, run_name=f"{spec.name}-{trial_id}")
    d = cfg.to_dict()
    storage = Storage(cfg.storage)
    if not storage.is_s3 and not d["wandb"]["dir"]:
        d["wandb"]["dir"] = storage.join(spec.name, "wandb")
    if spec.trial_runner == "function":
        d["scaling"]["cpus_per_worker"] = trial_resources(spec)["CPU"]
    return PipelineConfig.from_dict(d)


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """Resources Tune reserves for one trial."""
    if spec.trial_runner == "train":
        return {"CPU": TRAIN_DRIVER_CPU}  # the workers reserve their own resources (base.scaling)
    if spec.trial_resources:
        return dict(spec.trial_resources)
    sc = spec.base.scaling
    return {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}


def run_trial(spec: SweepSpec, params: dict[str, Any], trial_id: str,
              report_fn: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Train the sweep's stage chain for one trial; returns the URI of the last stage's final checkpoint.
    A restarted trial resumes every stage from its newest checkpoint in storage (run_stage does that)."""
    cfg = trial_config(spec, params, trial_id)
    storage = Storage(cfg.storage)
    paths = SweepPaths(storage, spec.name)
    init, offset, final = None, 0, ""
    for stage in spec.stages:
        job = StageJob(config=cfg, stage=stage, tokenizer_path=paths.tokenizer, stage_path=paths.stage(trial_id, stage),
                       init_checkpoint=init, val_source=cfg.tokenizer.corpus, wandb_group=spec.name)
        if spec.trial_runner == "function":
            run_stage(job, TuneSession(job, spec.objective, offset, report_fn))
        else:
            _fit_stage(job, spec, offset)
        steps = cfg.stage(stage).steps
        done = list_checkpoints(storage, job.stage_path)
        if not done or done[0][0] != steps:
            raise RuntimeError(f"trial {trial_id} stage {stage}: no complete checkpoint at step {steps} in "
                               f"{storage.uri_for(job.stage_path)}")
        final = init = storage.uri_for(done[0][1])
        offset += steps
    return final


def _fit_stage(job: StageJob, spec: SweepSpec, step_offset: int) -> None:
    """One TorchTrainer fit of a stage inside a Tune trial (trial_runner: train), laid out like the DAG's."""
    build_trainer(job, callbacks=[_objective_callback(spec.objective, step_offset, job.stage)]).fit()


def _tune_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """The Tune function trainable: `config` holds one value per swept field path."""
    from ray import tune

    run_trial(spec, {p: config[p] for p in spec.space}, tune.get_context().get_trial_id())


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id  # short and stable across restores; the params are in the trial's params.json


# ------------------------------------------------------------------------------------------------------- driver
@dataclass
class SweepOutcome:
    spec: SweepSpec
    rows: list[TrialRow]
    results_uri: str  # <storage>/<sweep>/results
    best: TrialRow | None
    best_yaml: str | None  # the best trial's pipeline config as YAML
    seconds: float

    @property
    def markdown(self) -> str:
        return results_markdown(self.spec, self.rows)


def run_sweep(spec: SweepSpec, address: str | None = None, resume: bool = False, echo=say) -> SweepOutcome:
    """Run a sweep (or, with resume, continue the one of the same name in storage) and write its results.

    A new sweep refuses a name that already exists in storage (resume it, or pick another name). Resuming restores
    the Tune experiment: finished and early-stopped trials keep their results, unfinished and errored ones continue
    from their newest checkpoints, trials never started start."""
    t0 = time.perf_counter()
    storage = Storage(spec.base.storage)
    storage.check_reachable()  # fail in seconds, before any cluster work, naming the endpoint
    paths = SweepPaths(storage, spec.name)
    if resume:
        state = storage.read_json(paths.state)
    else:
        if storage.exists(paths.state):
            raise ConfigError(f"sweep {spec.name!r} already exists in {storage.uri_for(paths.root)}: continue it "
                              f"with `rnc tune --resume {spec.name}` or choose another --name")
        state = {"spec": spec.to_dict(), "tokenizer": None, "created": time.time()}
        storage.write_json(paths.state, state)
    ensure_ray(address)
    if not state.get("tokenizer"):
        echo(f"== sweep {spec.name}: training the tokenizer once for all trials")
        _, metrics = run_tokenizer_stage(spec.candidate_config({}, run_name=spec.name), storage)
        state["tokenizer"] = metrics
        storage.write_json(paths.state, state)  # written after the upload: a recorded tokenizer is complete
    tuner = _make_tuner(spec, storage, paths, resume)
    echo(f"== sweep {spec.name}: {'resuming' if resume else 'starting'} -> {storage.uri_for(paths.root)}")
    tuner.fit()
    rows = collect_rows(spec, storage)
    best = best_row(rows)
    best_yaml = best_config(spec, best).to_yaml() if best else None
    _write_results(spec, rows, best_yaml, storage, paths)
    return SweepOutcome(spec, rows, storage.uri_for(paths.results), best, best_yaml, time.perf_counter() - t0)


def resume_sweep(name: str, storage: StorageConfig, address: str | None = None, echo=say) -> SweepOutcome:
    """Continue sweep `name` from the spec stored with it (`rnc tune --resume NAME`)."""
    st = Storage(storage)
    st.check_reachable()
    paths = SweepPaths(st, name)
    if not st.exists(paths.state):
        raise ConfigError(f"no sweep named {name!r} in {storage.uri} (looked for {st.uri_for(paths.state)})")
    stored = st.read_json(paths.state)["spec"]
    stored["base"]["storage"] = dataclasses.asdict(storage)  # where it was found now (endpoints can differ)
    spec = SweepSpec.from_dict(stored, name=name)
    return run_sweep(spec, address=address, resume=True, echo=echo)


def _make_tuner(spec: SweepSpec, storage: Storage, paths: SweepPaths, resume: bool):
    import ray
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(_tune_trial, spec=spec), trial_resources(spec))
    fs = storage.ray_storage_filesystem()
    if resume and tune.Tuner.can_restore(paths.experiment, storage_filesystem=fs):
        # resume_errored: a trial that failed (e.g. a lost node) continues from its checkpoints in storage.
        return tune.Tuner.restore(paths.experiment, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    max_concurrent = spec.max_concurrent_trials
    if max_concurrent is None and spec.trial_runner == "train":
        # Train-runner trials reserve almost nothing for themselves; without a cap, trials would start and then
        # wait for worker resources. Cap at what the cluster can run at once.
        sc = spec.base.scaling
        per_trial = sc.num_workers * sc.cpus_per_worker
        max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="min", scheduler=_scheduler(spec),
                                    search_alg=_search_alg(spec, max_concurrent), num_samples=spec.num_samples,
                                    # Tune ignores this for the default generator, which takes it itself
                                    max_concurrent_trials=max_concurrent if spec.search_alg else None,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=Path(paths.experiment).name,
            storage_path=paths.root,
            storage_filesystem=fs,
            # Function trials restart from their checkpoints in storage; TorchTrainer retries its own workers.
            failure_config=tune.FailureConfig(max_failures=spec.base.max_failures if spec.trial_runner == "function"
                                              else 0),
        ),
    )


def _scheduler(spec: SweepSpec):
    if spec.scheduler.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    first_eval = min(spec.base.stage(spec.stages[0]).eval_every, spec.base.stage(spec.stages[0]).steps)
    grace, max_t = spec.scheduler.resolved(spec.total_steps, first_eval)
    return ASHAScheduler(time_attr=TIME_ATTR, grace_period=grace, reduction_factor=spec.scheduler.reduction_factor,
                         max_t=max_t)


def _search_alg(spec: SweepSpec, max_concurrent: int | None):
    if spec.search_alg is None:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune's default (grid + random), seeded so that the same sweep file draws the same values.
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent or 0)
    from ray.tune.search import create_searcher

    kwargs = {k: v for k, v in spec.search_alg.items() if k != "type"}
    return create_searcher(spec.search_alg["type"].lower(), metric=OBJECTIVE, mode="min", **kwargs)


# ------------------------------------------------------------------------------------------------------ results
def stored_trials(storage: Storage, name: str) -> list[dict[str, Any]]:
    """Trials of sweep `name` as saved in its Tune experiment state: trial_id, status, config, last_result, error.
    Reads storage only (no cluster needed); [] before the experiment state was first saved."""
    from ray.tune import ExperimentAnalysis

    paths = SweepPaths(storage, name)
    try:
        analysis = ExperimentAnalysis(paths.experiment, storage_filesystem=storage.ray_storage_filesystem())
    except ValueError:  # no experiment_state-*.json yet: Tune has not saved its first snapshot
        return []
    out = []
    for t in analysis.trials:
        error = None
        if t.status == "ERROR":
            try:
                error = str(t.get_pickled_error() or "") or "error"
            except Exception:  # an unreadable error file must not hide the other trials' results
                error = "error (details in the trial's error.txt)"
        out.append({"trial_id": t.trial_id, "status": t.status, "config": dict(t.config),
                    "last_result": dict(t.last_result or {}), "error": error})
    return out


def collect_rows(spec: SweepSpec, storage: Storage) -> list[TrialRow]:
    """One TrialRow per trial, from the stored experiment state and the trials' checkpoints."""
    paths = SweepPaths(storage, spec.name)
    rows = []
    for t in stored_trials(storage, spec.name):
        last = t["last_result"]
        done = list_checkpoints(storage, paths.stage(t["trial_id"], spec.stages[-1]))
        objective = last.get(OBJECTIVE)
        rows.append(TrialRow(
            trial_id=t["trial_id"], status=t["status"], params={p: t["config"].get(p) for p in spec.space},
            objective=float(objective) if isinstance(objective, int | float) and math.isfinite(objective) else None,
            val_bpb={r: last[f"val_bpb_r{r}"] for r in spec.objective.recurrences if f"val_bpb_r{r}" in last},
            bpb_gain=last.get("bpb_gain"), steps=int(last.get(TIME_ATTR, 0)), total_steps=spec.total_steps,
            reports=int(last.get("training_iteration", 0)),
            checkpoint=storage.uri_for(done[0][1]) if done else None, error=t["error"]))
    return rows


def _write_results(spec: SweepSpec, rows: list[TrialRow], best_yaml: str | None, storage: Storage,
                   paths: SweepPaths) -> None:
    with tempfile.TemporaryDirectory(prefix="rnc-sweep-") as tmp:
        out = Path(tmp)
        (out / "results.md").write_text(results_markdown(spec, rows))
        (out / "results.json").write_text(results_json(spec, rows))
        plot_objective(spec, rows, out / "objective.png")
        if best_yaml:
            (out / "best.yaml").write_text(best_yaml)
        storage.upload_dir(out, paths.results)


# ----------------------------------------------------------------------------------------------------------- CLI
def add_tune_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register `rnc tune` (called by rnc.cli)."""
    p = subparsers.add_parser("tune", help="Ray Tune sweep over a pipeline stage (ASHA, objective across r)",
                              description="Run a sweep file, or resume an interrupted sweep by name.")
    p.add_argument("--config", help="sweep file (YAML); see examples/sweep-tiny.yaml")
    p.add_argument("--resume", metavar="NAME", help="continue sweep NAME from its storage; finished trials are kept")
    p.add_argument("--name", help="sweep name (default: the file's `name`, else its stem)")
    p.add_argument("--storage", help="local folder or s3://bucket/prefix (default: base.storage, else ./runs)")
    p.add_argument("--storage-endpoint", help="S3-compatible endpoint URL (MinIO); default AWS_ENDPOINT_URL")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--export", metavar="FILE", help="write the best trial's pipeline config here (YAML)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    if not args.config and not args.resume:
        raise ConfigError("give --config SWEEP.yaml (a new sweep) or --resume NAME")
    if args.resume and args.name:
        raise ConfigError("--name names a new sweep; with --resume the name is the one given to --resume")
    storage = None
    if args.storage or args.storage_endpoint:
        if not args.storage:
            raise ConfigError("--storage-endpoint needs --storage s3://bucket/prefix")
        storage = {"uri": args.storage, **({"endpoint_url": args.storage_endpoint} if args.storage_endpoint else {})}
    if args.resume:
        if storage:
            where = StorageConfig(**storage)
        elif args.config:
            where = SweepSpec.from_yaml(args.config).base.storage
        else:
            where = StorageConfig(uri="./runs")
        outcome = resume_sweep(args.resume, where, address=args.address)
    else:
        spec = SweepSpec.from_yaml(args.config, name=args.name, storage=storage)
        print(f"rnc: sweep {spec.name!r}: {len(spec.space)} field(s), stage {'->'.join(spec.stages)}, "
              f"runner {spec.trial_runner} -> {spec.base.storage.uri}", flush=True)
        outcome = run_sweep(spec, address=args.address)
    print(f"\n== sweep {outcome.spec.name} finished in {outcome.seconds:.0f}s; results in {outcome.results_uri}\n")
    print(outcome.markdown)
    failed = [r for r in outcome.rows if r.status == "ERROR"]
    for r in failed:
        last_line = (r.error or "").strip().splitlines()[-1:] or ["(no error message)"]
        print(f"rnc: trial {r.trial_id} failed: {last_line[0]}", file=sys.stderr)
    if args.export:
        if outcome.best_yaml is None:
            raise ConfigError("--export: no trial trained to the end, so there is no best config to export")
        Path(args.export).write_text(outcome.best_yaml)
        print(f"best trial {outcome.best.trial_id if outcome.best else ''}: config written to {args.export} "
              f"(run it: rnc pipeline run --config {args.export})")
    return 1 if failed else 0  # a sweep with failed trials must not look green in a script


__all__ = ["TuneSession", "SweepPaths", "SweepOutcome", "run_sweep", "resume_sweep", "run_trial", "trial_result",
           "trial_config", "stored_trials", "collect_rows", "add_tune_subcommand"]
