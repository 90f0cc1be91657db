"""recursive_model.optim: the optimizers and LR schedule shared by the training loop and the GPU benchmark, and the
peak FLOP/s table MFU is measured against."""

from __future__ import annotations

import pytest
import torch

from recursive_model import GPT, GPTConfig
from recursive_model.optim import (
    PEAK_FLOPS,
    OptimizerSettings,
    build_optimizers,
    device_peak_flops,
    lr_multiplier,
    peak_flops_from_name,
    set_lr_multiplier,
)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("exit_gate", [False, True])
def test_every_parameter_is_optimized_once_with_its_own_lr(optimizer, exit_gate):
    model = GPT(GPTConfig.from_preset("tiny", exit_gate=exit_gate))
    settings = OptimizerSettings(optimizer=optimizer, lr=0.02, embedding_lr=0.2, head_lr=0.004)
    optimizers = build_optimizers(model, settings)
    lr_of = {id(p): g["lr"] for opt in optimizers for g in opt.param_groups for p in g["params"]}
    owners = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(owners) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert lr_of[id(model.wte.weight)] == 0.2 and lr_of[id(model.lm_head.weight)] == 0.004
    assert lr_of[id(model.recur[0].attn.c_q.weight)] == lr_of[id(model.adapter.weight)] == 0.02
    muon = [opt for opt in optimizers if isinstance(opt, torch.optim.Muon)]
    assert len(muon) == (optimizer == "muon")
    if muon:  # Muon takes the 2-D block, adapter and gate matrices; embedding, head and vectors stay with AdamW
        assert {id(p) for g in muon[0].param_groups for p in g["params"]} == {
            id(p) for n, p in model.named_parameters() if not n.startswith(("wte.", "lm_head.")) and p.ndim == 2
        }
    if exit_gate:
        assert lr_of[id(model.exit_gate.bias)] == 0.02
        loss = model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))
        loss.backward()
        for opt in optimizers:
            opt.step()  # Muon would refuse a 1-D parameter


def test_lr_multiplier_scales_every_group_from_its_initial_lr():
    settings = OptimizerSettings(steps=100, warmup_steps=10, warmdown_frac=0.1, final_lr_frac=0.05)
    optimizers = build_optimizers(GPT(GPTConfig.from_preset("tiny")), settings)
    for step, mult in ((0, 0.1), (50, 1.0), (99, 0.05 + 0.95 * 0.1)):
        assert lr_multiplier(step, settings) == pytest.approx(mult)
        set_lr_multiplier(optimizers, lr_multiplier(step, settings))
        for group in (g for opt in optimizers for g in opt.param_groups):
            assert group["lr"] == pytest.approx(group["initial_lr"] * mult)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(optimizer="sgd"), "optimizer"),
        (dict(lr=0.0), "lr"),
        (dict(head_lr=20.0), "head_lr"),
        (dict(steps=0), "steps"),
        (dict(warmdown_frac=1.5), "warmdown_frac"),
    ],
)
def test_settings_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"OptimizerSettings\.{field}="):
        OptimizerSettings(**overrides)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_flops_read_from_the_device_name(name, peak):
    assert peak_flops_from_name(name) == peak


def test_cpu_peak_flops():
    assert device_peak_flops("cpu") == PEAK_FLOPS["cpu"]
