"""The one training loop: pretrain, mid-training and SFT differ only in their StageConfig.

`run_stage(job, session)` is plain PyTorch plus a `Session` that hides where it runs: `RaySession` inside a Ray Train
worker (DDP, ray.train.report, Ray custom metrics) or `LocalSession` in one process (tests, the overhead benchmark).
Checkpoints are the self-describing directories of the `checkpoints` package, written under
`<run>/<stage>/step_XXXXXX` in the run's storage; a restarted stage resumes from the newest one that verifies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from checkpoints import (
    INFERENCE_PARTS,
    Storage,
    checkpoint_name,
    fetch_checkpoint,
    fetch_latest_valid,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from recursive_model import GPT, GPTConfig, Tokenizer, recur_generator
from recursive_model.data import ConversationLoader, evaluate_bpb, text_loader
from recursive_model.optim import PEAK_FLOPS, build_optimizers, device_peak_flops, lr_multiplier, set_lr_multiplier
from recursive_model.tasks import build_mixture

from .config import PipelineConfig, StageConfig

logger = logging.getLogger(__name__)


@dataclass
class StageJob:
    """Everything the workers of one stage need; picklable (sent to Ray workers)."""

    config: PipelineConfig
    stage: str
    tokenizer_path: str  # storage path of the tokenizer directory
    stage_path: str  # storage path of this stage's checkpoints (the Ray Train experiment directory)
    init_checkpoint: str | None = None  # storage path of the previous stage's final checkpoint
    val_source: str = "shipped"  # corpus whose val split gives bits-per-byte in every stage
    wandb_group: str | None = None  # None -> config.run_name; a sweep puts all its trials in one group

    @property
    def stage_config(self) -> StageConfig:
        return self.config.stage(self.stage)

    @property
    def storage(self) -> Storage:
        return Storage(self.config.storage)


# --------------------------------------------------------------------------------------------------------- sessions
class Session:
    """Where the loop runs: ranks, model wrapping, reporting and checkpoint persistence."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def prepare_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model.to(device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        raise NotImplementedError


class LocalSession(Session):
    """One process, no Ray: persists checkpoints itself (same layout, same retrying upload) and keeps the last K."""

    def __init__(self, job: StageJob):
        self.job = job
        self.history: list[dict[str, Any]] = []

    def report(self, metrics, checkpoint_dir, name):
        self.history.append(dict(metrics))
        if checkpoint_dir is None:
            return
        storage = self.job.storage
        storage.upload_dir(checkpoint_dir, f"{self.job.stage_path}/{name}")
        complete = [p for _, p in list_checkpoints(storage, self.job.stage_path)]
        for old in complete[self.job.stage_config.keep_last:]:
            storage.delete_dir(old)


class RaySession(Session):
    """Inside a Ray Train worker: DDP via Ray, `ray.train.report` with a retrying upload, Ray custom metrics."""

    def __init__(self, job: StageJob):
        import ray.train

        ctx = ray.train.get_context()
        self.job = job
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        self._gauges: dict[str, Any] = {}
        # One INFO line per report (with the whole metrics dict) drowns the progress lines; keep warnings.
        # (That module names its logger by file path.)
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    def prepare_model(self, model, device):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=device)

    def _upload(self, checkpoint, dir_name: str):
        """Ray's own upload does not retry; ours retries each file with backoff and writes the manifest last."""
        import ray.train

        dest = f"{self.job.stage_path}/{dir_name}"
        storage = self.job.storage
        storage.upload_dir(checkpoint.path, dest)
        return ray.train.Checkpoint(dest, filesystem=storage.ray_storage_filesystem())

    def report(self, metrics, checkpoint_dir, name):
        import ray.train

        self._export_metrics(metrics)
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt else None,
                         checkpoint_upload_fn=self._upload if ckpt else None)

    def _export_metrics(self, metrics: dict[str, Any]) -> None:
        """Ray custom metrics (exported as ray_rnc_train_*), visible in the dashboard's metrics view."""
        if self.rank != 0:
            return
        from ray.util.metrics import Gauge

        tags = {"run": self.job.config.run_name, "stage": self.job.stage}
        for key in ("loss", "tokens_per_s", "mfu", "num_recur", "lr", "step"):
            if key in metrics:
                if key not in self._gauges:
                    self._gauges[key] = Gauge(f"rnc_train_{key}", f"training {key}", tag_keys=("run", "stage"))
                self._gauges[key].set(float(metrics[key]), tags=tags)
        for key, value in metrics.items():
            if key.startswith("val_bpb"):
                if "val_bpb" not in self._gauges:
                    self._gauges["val_bpb"] = Gauge("rnc_val_bpb", "validation bits per byte",
                                                    tag_keys=("run", "stage", "recur"))
                self._gauges["val_bpb"].set(float(value), tags={**tags, "recur": key.split("_r")[-1]})


def ray_train_loop(loop_config: dict[str, Any]) -> None:
    """The `train_loop_per_worker` of every stage's TorchTrainer (`train_loop_config={"job": StageJob}`)."""
    job = loop_config["job"]
    run_stage(job, RaySession(job))


def build_trainer(job: StageJob, callbacks: list | None = None):
    """The TorchTrainer of one stage: workers from `scaling`, Ray's experiment dir is `job.stage_path`, restarts on
    worker failure (`max_failures`), the last `keep_last` checkpoints kept. Used by the DAG and by Tune trials."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg, storage = job.config, job.storage
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    parent, name = job.stage_path.rsplit("/", 1)
    return TorchTrainer(
        ray_train_loop,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=storage.ray_storage_filesystem(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.stage_config.keep_last),
            callbacks=callbacks,
        ),
    )


# ---------------------------------------------------------------------------------------------------- optimizers
# build_optimizers, lr_multiplier and set_lr_multiplier live in recursive_model.optim (Ray-free: the GPU benchmark
# runs the same optimizer step without Ray).
def peak_flops(config: PipelineConfig, device: torch.device) -> float:
    if config.device_peak_flops:
        return config.device_peak_flops
    # A GPU missing from the table counts as an A100; set device_peak_flops for a true MFU on it.
    return device_peak_flops(device) or PEAK_FLOPS["a100"]


# ------------------------------------------------------------------------------------------------------- data
def make_train_loader(job: StageJob, tokenizer: Tokenizer, model_cfg: GPTConfig, session: Session, state):
    stage = job.stage_config
    kw = dict(rank=session.rank, world_size=session.world_size, shuffle_seed=job.config.seed, state=state)
    if stage.name == "pretrain":
        return text_loader(stage.data, tokenizer, stage.batch_size, model_cfg.sequence_len, split="train", **kw)
    mixture = build_mixture(stage.data, seed=job.config.seed)
    return ConversationLoader(mixture, tokenizer, stage.batch_size, model_cfg.sequence_len,
                              max_conversation_tokens=model_cfg.sequence_len, **kw)


def make_val_batches(job: StageJob, tokenizer: Tokenizer, model_cfg: GPTConfig) -> list:
    """A fixed list of validation batches (same on every rank, same in every stage)."""
    stage = job.stage_config
    loader = text_loader(job.val_source, tokenizer, stage.batch_size, model_cfg.sequence_len, split="val",
                         infinite=False)
    return [batch for _, batch in zip(range(stage.eval_batches), loader, strict=False)]


# ------------------------------------------------------------------------------------------------------- wandb
def _init_wandb(job: StageJob, session: Session):
    """wandb on world rank 0 only (Ray's setup_wandb made runs on every rank); offline unless a key is set."""
    spec = job.config.wandb
    mode = spec.resolved_mode()
    if session.rank != 0 or mode == "disabled":
        return None
    import wandb

    storage = job.storage
    default = storage.join(job.config.run_name, "wandb") if not storage.is_s3 else "~/.cache/rnc/wandb"
    wdir = os.path.expanduser(spec.dir or default)  # offline runs stay on disk for `wandb sync`
    os.makedirs(wdir, exist_ok=True)
    group = job.wandb_group or job.config.run_name
    return wandb.init(project=spec.project, group=group, name=f"{job.config.run_name}-{job.stage}",
                      job_type=job.stage, config=job.config.to_dict(), mode=mode, dir=wdir, reinit="create_new",
                      settings=wandb.Settings(quiet=True, console="off"))


# -------------------------------------------------------------------------------------------------------- loop
@dataclass
class StageOutcome:
    final_step: int
    resumed_from: int  # 0 when the stage started fresh
    metrics: dict[str, Any] = field(default_factory=dict)


def say(message: str) -> None:
    """Progress line to stdout. Not print(): Ray Train patches print into its logger, and with wandb wrapping
    stdout every line would then appear twice on the driver."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_stage(job: StageJob, session: Session, work_dir: str | None = None) -> StageOutcome:
    """Train one stage to `steps`, resuming from its newest valid checkpoint; the one loop for every stage."""
    cfg, stage = job.config, job.stage_config
    storage = job.storage
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{session.local_rank}" if use_gpu else "cpu")
    if not use_gpu and cfg.scaling.cpus_per_worker >= 1:
        torch.set_num_threads(int(cfg.scaling.cpus_per_worker))
    tmp = tempfile.mkdtemp(prefix=f"rnc-{job.stage}-", dir=work_dir)
    try:
        tokenizer = Tokenizer.load(storage.local_dir(job.tokenizer_path, os.path.join(tmp, "tokenizer")))
        latest = fetch_latest_valid(storage, job.stage_path, tmp, echo=say)
        opt_state, data_state, start_step = None, None, 0
        if latest is not None:
            start_step, verified = latest
            loaded = load_checkpoint(verified, load_optimizer=True)
            model, opt_state, data_state = loaded.model, loaded.optimizer_state, loaded.meta.get("data")
            if session.rank == 0:
                say(f"[{cfg.run_name}/{job.stage}] resuming from step {start_step}")
        elif job.init_checkpoint:
            init = fetch_checkpoint(job.init_checkpoint, INFERENCE_PARTS, storage=storage,
                                    cache_dir=os.path.join(tmp, "init"))
            model = load_checkpoint(init).model
        else:
            torch.manual_seed(cfg.seed)
            model = GPT(cfg.gpt_config())
        rec = stage.recurrence_for(cfg.gpt_config())  # this stage's draw of r and bptt_k
        # What the checkpoints record: the model's config with the recurrence this stage trained it with.
        model_cfg = dataclasses.replace(model.config, recurrence=rec)
        raw_model = model
        model = session.prepare_model(model, device)
        optimizers = build_optimizers(raw_model, stage)
        if opt_state is not None:
            for opt, state in zip(optimizers, opt_state["optimizers"], strict=True):
                opt.load_state_dict(state)
        loader = make_train_loader(job, tokenizer, model_cfg, session, data_state)
        val_batches = make_val_batches(job, tokenizer, model_cfg) if session.rank == 0 else []
        token_bytes = tokenizer.token_bytes()
        eval_recur = stage.eval_recur or [model_cfg.decode.num_recur]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_gpu else torch.autocast("cpu", enabled=False)
        run = _init_wandb(job, session)
        peak = peak_flops(cfg, device)
        tokens_per_step = stage.batch_size * model_cfg.sequence_len * stage.grad_accum * session.world_size
        metrics: dict[str, Any] = {}
        train_seconds, steps_done = 0.0, 0  # tokens/s and ETA count training steps only, not eval or checkpoints
        for step in range(start_step, stage.steps):
            t_step = time.perf_counter()
            # The same (seed, step) on every rank and after every resume: ranks never wait on each other.
            r = rec.sample(recur_generator(cfg.seed, step)) if model_cfg.is_recursive else 1
            torch.manual_seed(cfg.seed * 1_000_003 + step * 101 + session.rank)  # noise state init replays too
            set_lr_multiplier(optimizers, lr_multiplier(step, stage))
            loss_sum = 0.0
            for _ in range(stage.grad_accum):
                x, y = next(loader)
                with autocast:
                    loss = model(x.to(device), targets=y.to(device), num_recur=r, bptt_k=rec.bptt_k,
                                 supervise=rec.supervise, gate_entropy=rec.gate_entropy)
                (loss / stage.grad_accum).backward()
                loss_sum += loss.item() / stage.grad_accum
            grad_norm = (torch.nn.utils.clip_grad_norm_(raw_model.parameters(), stage.grad_clip)
                         if stage.grad_clip > 0 else torch.tensor(0.0))
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            steps_done += 1
            train_seconds += time.perf_counter() - t_step
            done = step + 1
            is_last = done == stage.steps
            log_now = done % stage.log_every == 0 or is_last
            eval_now = done % stage.eval_every == 0 or is_last
            ckpt_now = done % stage.checkpoint_every == 0 or is_last
            if not (log_now or eval_now or ckpt_now):
                continue
            step_time = train_seconds / steps_done
            tok_s = tokens_per_step / step_time
            metrics = {
                "step": done, "loss": loss_sum, "num_recur": r, "lr": optimizers[0].param_groups[-1]["lr"],
                "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                "mfu": raw_model.flops_per_token(r, bptt_k=rec.bptt_k, supervise=rec.supervise) * tok_s
                / (peak * session.world_size),
                "tokens_seen": done * tokens_per_step, "resumed_from": start_step,
            }
            if eval_now and session.rank == 0:
                for er in eval_recur:
                    metrics[f"val_bpb_r{er}"] = evaluate_bpb(raw_model, val_batches, token_bytes, num_recur=er)
            if session.rank == 0 and log_now:
                extra = " ".join(f"bpb@r{k.split('_r')[-1]}={v:.3f}" for k, v in metrics.items()
                                 if k.startswith("val_bpb"))
                say(f"[{cfg.run_name}/{job.stage}] step {done}/{stage.steps} loss {loss_sum:.3f} r={r} "
                    f"{tok_s:,.0f} tok/s mfu {metrics['mfu']:.2%} eta {_fmt_eta(step_time * (stage.steps - done))}"
                    f" {extra}".rstrip())
            if run is not None:
                run.log(metrics, step=done)
            ckpt_dir, name = None, None
            if ckpt_now and session.rank == 0:
                name = checkpoint_name(storage, job.stage_path, done)
                ckpt_dir = os.path.join(tmp, "out", name)
                meta = {"stage": job.stage, "step": done, "run_name": cfg.run_name, "data": loader.state_dict(),
                        "pipeline_config": cfg.to_dict(), "metrics": metrics}
                opt_state = {"optimizers": [opt.state_dict() for opt in optimizers]}
                save_checkpoint(ckpt_dir, raw_model, model_cfg, tokenizer, meta, optimizer_state=opt_state)
            session.report(metrics, ckpt_dir, name)
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        if run is not None:
            run.finish()
        return StageOutcome(final_step=stage.steps, resumed_from=start_step, metrics=metrics)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["StageJob", "run_stage", "ray_train_loop", "build_trainer", "LocalSession", "RaySession",
           "build_optimizers", "lr_multiplier"]
