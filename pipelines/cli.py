"""`rnc pipeline run|submit|status` and `rnc config show`: each command parses, builds a typed config and calls one
function. The `rnc` entry point itself is rnc/cli.py."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from .config import ALL_STAGES, PipelineConfig

# What a Ray Job needs of this repository (runtime_env py_modules): every package `rnc` imports.
PROJECT_PACKAGES = ("rnc", "recursive_model", "checkpoints", "export", "pipelines", "serve")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def load_pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    """--preset / --config plus --storage / --run-name / endpoint overrides -> a validated PipelineConfig."""
    if getattr(args, "config", None) and getattr(args, "preset", None):
        raise CliError("give --preset or --config, not both")
    overrides = {}
    storage = {}
    if getattr(args, "storage", None):
        storage["uri"] = args.storage
    if getattr(args, "storage_endpoint", None):
        storage["endpoint_url"] = args.storage_endpoint
    if storage:
        overrides["storage"] = storage
    if getattr(args, "run_name", None):
        overrides["run_name"] = args.run_name
    if args.config:
        cfg = PipelineConfig.from_yaml(args.config)
        if overrides:
            d = cfg.to_dict()
            for k, v in overrides.items():
                d[k] = {**d[k], **v} if isinstance(v, dict) else v
            if "storage" in overrides and "uri" in storage:
                d["storage"] = {**storage}
            cfg = PipelineConfig.from_dict(d)
        return cfg
    return PipelineConfig.from_preset(args.preset or "cpu-small", **overrides)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="pipeline preset: cpu-small (default), tiny, d20-recursive, d20")
    p.add_argument("--config", help="pipeline config YAML (as printed by `rnc config show`)")
    p.add_argument("--storage", help="local folder or s3://bucket/prefix (default from the config: ./runs)")
    p.add_argument("--storage-endpoint", help="S3-compatible endpoint URL (MinIO); default AWS_ENDPOINT_URL")
    p.add_argument("--run-name", help="run name; the same name resumes / skips finished stages")


# ------------------------------------------------------------------------------------------------------- commands
def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from .dag import run_pipeline

    cfg = load_pipeline_config(args)
    stages = args.stages.split(",") if args.stages else None
    print(f"rnc: run {cfg.run_name!r} -> {cfg.storage.uri} (model {cfg.model}, stages {stages or 'all'})", flush=True)
    result = run_pipeline(cfg, stages=stages, address=args.address)
    print("\n== pipeline finished")
    for name, rec in result.stages.items():
        print(f"  {name:<10} {rec['status']:<9} {rec.get('checkpoint') or ''}")
    if result.report_uri:
        print(f"  report card: {result.report_uri}/report_card.md")
        local_md = Path(result.report_uri) / "eval.md"
        if local_md.is_file():
            print("\n" + local_md.read_text())
    return 0


def cmd_pipeline_status(args: argparse.Namespace) -> int:
    from checkpoints import Storage

    from .manifest import PipelineManifest

    cfg = load_pipeline_config(args)
    storage = Storage(cfg.storage)
    storage.check_reachable()
    run = args.run or cfg.run_name
    if not storage.exists(storage.join(run, "pipeline.json")):
        raise CliError(f"no pipeline manifest for run {run!r} in {cfg.storage.uri}")
    rows = PipelineManifest.load(storage, run).to_table()
    cols = ["stage", "status", "config", "duration", "checkpoint", "metrics", "error"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols[:4]}
    print("  ".join(c.ljust(widths.get(c, 0)) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(widths.get(c, 0)) for c in cols))
    return 0


def submit_job(cfg: PipelineConfig, address: str, stages: str | None = None, extra_pip: list[str] | None = None) -> str:
    """Submit `rnc pipeline run` as a Ray Job: the project packages go in runtime_env.py_modules, the effective
    config as the job's working_dir. Returns the job id."""
    from ray.job_submission import JobSubmissionClient

    root = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="rnc-submit-"))
    (work / "pipeline.yaml").write_text(cfg.to_yaml())
    entry = "python -m rnc pipeline run --config pipeline.yaml"
    if stages:
        entry += f" --stages {stages}"
    runtime_env = {"working_dir": str(work), "py_modules": [str(root / p) for p in PROJECT_PACKAGES]}
    if extra_pip:
        runtime_env["pip"] = extra_pip
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env,
                               metadata={"rnc_run": cfg.run_name}, submission_id=None)
    shutil.rmtree(work, ignore_errors=True)
    return job_id


def cmd_pipeline_submit(args: argparse.Namespace) -> int:
    cfg = load_pipeline_config(args)
    job_id = submit_job(cfg, args.address, stages=args.stages)
    print(f"submitted job {job_id} (run {cfg.run_name!r})")
    print(f"  follow:  ray job logs --address {args.address} --follow {job_id}")
    print(f"  status:  ray job status --address {args.address} {job_id}")
    print(f"  stages:  rnc pipeline status {cfg.run_name} --storage {cfg.storage.uri}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_pipeline_config(args)
    sys.stdout.write(cfg.to_yaml())
    return 0


# ---------------------------------------------------------------------------------------------------------- parser
def add_pipeline_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register `rnc pipeline {run,submit,status}` and `rnc config show` (called by rnc.cli)."""
    pipe = sub.add_parser("pipeline", help="run, submit or inspect the tokenizer -> pretrain -> mid -> sft -> eval DAG")
    psub = pipe.add_subparsers(dest="pipeline_command", required=True)
    run = psub.add_parser("run", help="run the pipeline on a local Ray cluster or the one at --address")
    _add_config_args(run)
    run.add_argument("--stages", help=f"comma-separated subset of {','.join(ALL_STAGES)}")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    run.set_defaults(func=cmd_pipeline_run)
    submit = psub.add_parser("submit", help="submit the pipeline as a Ray Job to a cluster")
    _add_config_args(submit)
    submit.add_argument("--stages", help=f"comma-separated subset of {','.join(ALL_STAGES)}")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    submit.set_defaults(func=cmd_pipeline_submit)
    status = psub.add_parser("status", help="print the pipeline manifest of a run")
    status.add_argument("run", nargs="?", help="run name (default: the config's run_name)")
    _add_config_args(status)
    status.set_defaults(func=cmd_pipeline_status)

    conf = sub.add_parser("config", help="show configs")
    csub = conf.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the full effective pipeline config as YAML")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
