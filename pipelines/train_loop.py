"""The one training loop: pretrain, mid-training and SFT differ only in their StageConfig.

`run_stage(job, session)` is plain PyTorch plus a `Session` that hides where it runs: `RaySession` inside a Ray Train
worker (DDP, ray.train.report, Ray custom metrics) or `LocalSession` in one process (tests, the overhead benchmark).
Checkpoints are the self-describing directories of `recursive_model.checkpoint`, written under
`<run>/<stage>/step_XXXXXX` in the run's storage; a restarted stage resumes from the newest one that verifies.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from recursive_model import GPT, GPTConfig, Tokenizer, load_checkpoint, recur_generator, sample_num_recur
from recursive_model.checkpoint import save_checkpoint
from recursive_model.data import ConversationLoader, evaluate_bpb, text_loader
from recursive_model.tasks import build_mixture

from .config import PEAK_FLOPS, PipelineConfig, StageConfig
from .storage import CheckpointCorrupt, Storage

logger = logging.getLogger(__name__)
STEP_DIR_RE = re.compile(r"^step_(\d{6})(?:-r(\d+))?$")


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


# --------------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(storage: Storage, stage_path: str) -> list[tuple[int, str]]:
    """Complete checkpoints (manifest present) of a stage, newest first, as (step, path)."""
    if not storage.exists(stage_path):
        return []
    found = []
    for name in storage.list_dirs(stage_path):
        m = STEP_DIR_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
        path = f"{stage_path}/{name.rstrip('/').rsplit('/', 1)[-1]}"
        if m and storage.is_complete_checkpoint(path):
            found.append((int(m.group(1)), int(m.group(2) or 0), path))
    return [(step, path) for step, _, path in sorted(found, reverse=True)]


def fetch_latest_valid(storage: Storage, stage_path: str, local_dir: str) -> tuple[int, str] | None:
    """Download the newest checkpoint whose files match its manifest; corrupt ones are skipped with a warning."""
    for step, path in list_checkpoints(storage, stage_path):
        target = os.path.join(local_dir, f"step_{step}")
        try:
            storage.download_checkpoint(path, target)
            return step, target
        except CheckpointCorrupt as exc:
            logger.warning("skipping corrupt checkpoint %s: %s", storage.uri_for(path), exc)
            say(f"WARNING: skipping corrupt checkpoint {storage.uri_for(path)}: {exc}")
            shutil.rmtree(target, ignore_errors=True)
    return None


def checkpoint_name(storage: Storage, stage_path: str, step: int) -> str:
    """`step_000100`, or `step_000100-r1` if a (corrupt or partial) directory of that name exists already."""
    base, n = f"step_{step:06d}", 0
    name = base
    while storage.exists(f"{stage_path}/{name}"):
        n += 1
        name = f"{base}-r{n}"
    return name


# ---------------------------------------------------------------------------------------------------- optimizers
def build_optimizers(model: GPT, stage: StageConfig) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the block/adapter matrices plus AdamW for embedding and head (nanochat)."""
    matrices = [p for n, p in model.named_parameters() if not n.startswith(("wte.", "lm_head."))]
    adam_groups = [
        dict(params=[model.wte.weight], lr=stage.embedding_lr, weight_decay=0.0),
        dict(params=[model.lm_head.weight], lr=stage.head_lr, weight_decay=0.0),
    ]
    if stage.optimizer == "muon":
        opts = [
            torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10),
            torch.optim.Muon(matrices, lr=stage.lr, weight_decay=stage.weight_decay, adjust_lr_fn="match_rms_adamw"),
        ]
    else:
        adam_groups.append(dict(params=matrices, lr=stage.lr, weight_decay=stage.weight_decay))
        opts = [torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10)]
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opts


def lr_multiplier(step: int, stage: StageConfig) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac over the last warmdown_frac of steps."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    warmdown = round(stage.warmdown_frac * stage.steps)
    if warmdown and step >= stage.steps - warmdown:
        progress = (stage.steps - step) / warmdown
        return progress + (1 - progress) * stage.final_lr_frac
    return 1.0


def peak_flops(config: PipelineConfig, device: torch.device) -> float:
    if config.device_peak_flops:
        return config.device_peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return next((v for k, v in PEAK_FLOPS.items() if k in name), PEAK_FLOPS["a100"])
    return PEAK_FLOPS["cpu"]


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
        tokenizer = Tokenizer.load(_fetch_dir(storage, job.tokenizer_path, os.path.join(tmp, "tokenizer")))
        latest = fetch_latest_valid(storage, job.stage_path, tmp)
        opt_state, data_state, start_step = None, None, 0
        if latest is not None:
            start_step, local = latest
            loaded = load_checkpoint(local, load_optimizer=True)
            model, opt_state, data_state = loaded.model, loaded.optimizer_state, loaded.meta.get("data")
            if session.rank == 0:
                say(f"[{cfg.run_name}/{job.stage}] resuming from step {start_step}")
        elif job.init_checkpoint:
            model = load_checkpoint(_fetch_checkpoint(storage, job.init_checkpoint, os.path.join(tmp, "init"))).model
        else:
            torch.manual_seed(cfg.seed)
            model = GPT(cfg.gpt_config())
        model_cfg = stage.model_config(cfg.gpt_config())
        model.config = model_cfg  # stage-level recurrence sampling (bptt_k etc.) applies to this stage's forward
        raw_model = model
        model = session.prepare_model(model, device)
        optimizers = build_optimizers(raw_model, stage)
        if opt_state is not None:
            for opt, state in zip(optimizers, opt_state["optimizers"], strict=True):
                opt.load_state_dict(state)
        loader = make_train_loader(job, tokenizer, model_cfg, session, data_state)
        val_batches = make_val_batches(job, tokenizer, model_cfg) if session.rank == 0 else []
        token_bytes = tokenizer.token_bytes()
        eval_recur = stage.eval_recur or [model_cfg.eval_recur]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_gpu else torch.autocast("cpu", enabled=False)
        run = _init_wandb(job, session)
        peak = peak_flops(cfg, device)
        tokens_per_step = stage.batch_size * model_cfg.sequence_len * stage.grad_accum * session.world_size
        metrics: dict[str, Any] = {}
        train_seconds, steps_done = 0.0, 0  # tokens/s and ETA count training steps only, not eval or checkpoints
        for step in range(start_step, stage.steps):
            t_step = time.perf_counter()
            # The same (seed, step) on every rank and after every resume: ranks never wait on each other.
            r = sample_num_recur(model_cfg.train_recur_mean, model_cfg.recur_sigma, model_cfg.train_recur_max,
                                 recur_generator(cfg.seed, step)) if model_cfg.is_recursive else 1
            torch.manual_seed(cfg.seed * 1_000_003 + step * 101 + session.rank)  # noise state init replays too
            mult = lr_multiplier(step, stage)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * mult
            loss_sum = 0.0
            for _ in range(stage.grad_accum):
                x, y = next(loader)
                with autocast:
                    loss = model(x.to(device), targets=y.to(device), num_recur=r)
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
                "mfu": raw_model.flops_per_token(r) * tok_s / (peak * session.world_size),
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


def _fetch_dir(storage: Storage, path: str, local: str) -> str:
    if storage.is_s3:
        storage.download_dir(path, local)
        return local
    return path


def _fetch_checkpoint(storage: Storage, path: str, local: str) -> str:
    """A verified local copy of a checkpoint (local storage is verified in place by load_checkpoint)."""
    if storage.is_s3:
        storage.download_checkpoint(path, local)
        return local
    return path


__all__ = ["StageJob", "run_stage", "ray_train_loop", "build_trainer", "LocalSession", "RaySession",
           "list_checkpoints", "fetch_latest_valid", "build_optimizers", "lr_multiplier"]
