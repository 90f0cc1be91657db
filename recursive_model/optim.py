"""Optimizers, the learning-rate schedule and the peak FLOP/s that MFU is measured against; no Ray.

The training loop (pipelines/train_loop.py) and the GPU benchmark (benchmarks/gpu.py) build their optimizers here, so
the benchmark measures the step the pipeline runs. `build_optimizers` and `lr_multiplier` read their settings from any
object with the fields of `OptimizerSpec` / `ScheduleSpec`: a pipeline `StageConfig`, or an `OptimizerSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .model import GPT

OPTIMIZERS = ("adamw", "muon")
# Peak dense bf16 FLOP/s per device (no sparsity), matched against the lower-cased device name, longest key first so
# "h100 pcie" wins over "h100". GH200 carries an H100-class GPU and its name contains "h200": same peak. The CPU figure
# is a rough 2-core AVX2 fp32 number.
PEAK_FLOPS = {
    "h200": 989e12,
    "h100 pcie": 756e12,
    "h100": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "l40": 181e12,
    "l4": 121e12,
    "cpu": 2e11,
}


class OptimizerSpec(Protocol):
    optimizer: str  # adamw | muon
    lr: float  # matrix learning rate (AdamW) or Muon lr
    embedding_lr: float
    head_lr: float
    weight_decay: float


class ScheduleSpec(Protocol):
    steps: int
    warmup_steps: int
    warmdown_frac: float
    final_lr_frac: float


@dataclass(frozen=True)
class OptimizerSettings:
    """Optimizer and schedule settings outside a pipeline config (the fields of a StageConfig of the same name)."""

    optimizer: str = "adamw"  # adamw | muon (Muon for matrices, AdamW for embeddings and head, as nanochat)
    lr: float = 3e-3  # matrix learning rate (AdamW) or Muon lr
    embedding_lr: float = 3e-2  # token embedding learning rate
    head_lr: float = 3e-3  # lm_head learning rate
    weight_decay: float = 0.0
    steps: int = 100  # length of the schedule
    warmup_steps: int = 10  # linear warmup
    warmdown_frac: float = 0.3  # last fraction of steps decays linearly to final_lr_frac
    final_lr_frac: float = 0.05

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"OptimizerSettings.optimizer={self.optimizer!r}; allowed {OPTIMIZERS}")
        for name in ("lr", "embedding_lr", "head_lr"):
            if not 0 < getattr(self, name) < 10:
                raise ValueError(f"OptimizerSettings.{name}={getattr(self, name)!r} is out of range; allowed (0, 10)")
        checks = (
            ("weight_decay", 0, None),
            ("steps", 1, None),
            ("warmup_steps", 0, None),
            ("warmdown_frac", 0, 1),
            ("final_lr_frac", 0, 1),
        )
        for name, lo, hi in checks:
            value = getattr(self, name)
            if value < lo or (hi is not None and value > hi):
                raise ValueError(
                    f"OptimizerSettings.{name}={value!r} is out of range; allowed [{lo}, {'inf' if hi is None else hi}]"
                )


def build_optimizers(model: GPT, spec: OptimizerSpec) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the block/adapter/gate matrices plus AdamW for embedding, head and any vector
    parameter (nanochat).

    Every param group gets `initial_lr`, the base that `set_lr_multiplier` scales.
    """
    if spec.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={spec.optimizer!r}; allowed {OPTIMIZERS}")
    matrices = [p for n, p in model.named_parameters() if not n.startswith(("wte.", "lm_head."))]
    adam_groups = [
        dict(params=[model.wte.weight], lr=spec.embedding_lr, weight_decay=0.0),
        dict(params=[model.lm_head.weight], lr=spec.head_lr, weight_decay=0.0),
    ]
    if spec.optimizer == "muon":
        # Muon orthogonalises 2-D updates only; vectors (the exit gate's bias) stay with AdamW at the matrix lr, which
        # match_rms_adamw makes comparable.
        vectors = [p for p in matrices if p.ndim != 2]
        if vectors:
            adam_groups.append(dict(params=vectors, lr=spec.lr, weight_decay=0.0))
        opts = [
            torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10),
            torch.optim.Muon([p for p in matrices if p.ndim == 2], lr=spec.lr, weight_decay=spec.weight_decay,
                             adjust_lr_fn="match_rms_adamw"),
        ]
    else:
        adam_groups.append(dict(params=matrices, lr=spec.lr, weight_decay=spec.weight_decay))
        opts = [torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10)]
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opts


def lr_multiplier(step: int, spec: ScheduleSpec) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac over the last warmdown_frac of steps."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    warmdown = round(spec.warmdown_frac * spec.steps)
    if warmdown and step >= spec.steps - warmdown:
        progress = (spec.steps - step) / warmdown
        return progress + (1 - progress) * spec.final_lr_frac
    return 1.0


def set_lr_multiplier(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    """Set every group's lr to its `initial_lr` times `multiplier`."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def peak_flops_from_name(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device name ("NVIDIA H200", "cpu"); None for a device the table does not know."""
    name = device_name.lower()
    return next((PEAK_FLOPS[k] for k in sorted(PEAK_FLOPS, key=len, reverse=True) if k in name), None)


def device_peak_flops(device: torch.device | str) -> float | None:
    """Peak FLOP/s of `device` read from its name (PEAK_FLOPS); None for a GPU the table does not know."""
    device = torch.device(device)
    return peak_flops_from_name(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


__all__ = [
    "OPTIMIZERS",
    "PEAK_FLOPS",
    "OptimizerSettings",
    "OptimizerSpec",
    "ScheduleSpec",
    "build_optimizers",
    "lr_multiplier",
    "set_lr_multiplier",
    "peak_flops_from_name",
    "device_peak_flops",
]
