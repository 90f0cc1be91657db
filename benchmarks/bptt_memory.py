"""Activation memory of one training step (forward+backward) at r=16 vs r=4, truncated BPTT (bptt_k=4) vs full.

Method: activation memory = bytes of the distinct tensor storages that autograd saves for backward, collected with
`torch.autograd.graph.saved_tensors_hooks` during the forward, parameters and buffers excluded. These are exactly the
tensors held from the forward until backward frees them, so their sum is the activation part of a training step's
peak; the frozen (no-grad) recurrences save nothing. The bytes saved inside the recurrence are reported separately.
As a cross check, the peak of net CPU bytes allocated during the whole step (forward+backward, incl. parameter
gradients and transient buffers) is read from torch.profiler's allocation events. tracemalloc cannot see torch's
allocator.

    python benchmarks/bptt_memory.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks._common import emit, environment, parser
from recursive_model import GPT, GPTConfig

METHOD = (
    "saved_tensors_hooks: bytes of distinct storages saved for backward during the forward, parameters and buffers "
    "excluded (= activation memory held until backward); cross-check: torch.profiler allocation events, peak of net "
    "bytes allocated during forward+backward"
)


class SavedTensorBytes:
    """saved_tensors_hooks that record each distinct storage saved for backward, by phase. Parameters and buffers
    (rotary tables) are excluded: they are not activations."""

    def __init__(self, model: GPT):
        self.params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, tuple[int, str]] = {}  # data_ptr -> (nbytes, phase first seen in)
        self.phase = "outside_recurrence"

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.params and ptr not in self.storages and st.nbytes() > 0:
            self.storages[ptr] = (st.nbytes(), self.phase)
        return t

    def total(self, phase: str | None = None) -> int:
        return sum(n for n, ph in self.storages.values() if phase is None or ph == phase)


def saved_activation_bytes(model: GPT, x: torch.Tensor, r: int) -> dict[str, int]:
    """Forward under the hooks, then backward (so the step is complete); bytes saved for backward."""
    rec = SavedTensorBytes(model)
    eager_step = model.recur_step

    def tagged_step(*args, **kwargs):  # attribute the recurrence's saved tensors to it
        rec.phase = "recurrence"
        try:
            return eager_step(*args, **kwargs)
        finally:
            rec.phase = "outside_recurrence"

    model._recur_step = tagged_step  # instance attribute the forward calls; restored below
    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            loss = model(x, targets=x, num_recur=r)
        loss.backward()
    finally:
        model._recur_step = eager_step
    return {"total": rec.total(), "recurrence": rec.total("recurrence"), "distinct_storages": len(rec.storages)}


def profiler_peak_bytes(model: GPT, x: torch.Tensor, r: int) -> int | None:
    """Peak of net bytes allocated during forward+backward, from the profiler's allocation events (None if the
    profiler's event tree is unavailable in this torch version)."""
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x, targets=x, num_recur=r).backward()
    try:
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError):
        return None
    allocs, stack = [], list(roots)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return int(peak)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    if args.quick:
        preset, B, T, r_lo, r_hi = "tiny", 2, 32, 4, 16
    else:
        preset, B, T, r_lo, r_hi = "cpu-small", 4, 256, 4, 16
    results = {}
    for k in (4, r_hi):
        cfg = GPTConfig.from_preset(preset, recurrence=dict(r_max=r_hi, bptt_k=k))
        torch.manual_seed(0)
        model = GPT(cfg).train()
        x = torch.randint(0, cfg.vocab_size, (B, T))
        row = {}
        for r in (r_lo, r_hi):
            saved = saved_activation_bytes(model, x, r)
            row[f"r{r}"] = {
                "saved_bytes": saved["total"],
                "saved_bytes_recurrence": saved["recurrence"],
                "distinct_saved_storages": saved["distinct_storages"],
                "profiler_peak_step_bytes": profiler_peak_bytes(model, x, r),
            }
        lo, hi = row[f"r{r_lo}"], row[f"r{r_hi}"]
        row["ratio_saved"] = hi["saved_bytes"] / lo["saved_bytes"]
        row["ratio_saved_recurrence"] = hi["saved_bytes_recurrence"] / lo["saved_bytes_recurrence"]
        if lo["profiler_peak_step_bytes"] and hi["profiler_peak_step_bytes"]:
            row["ratio_profiler_peak"] = hi["profiler_peak_step_bytes"] / lo["profiler_peak_step_bytes"]
        results[f"bptt_k{k}"] = row
    ratio = results["bptt_k4"]["ratio_saved"]
    emit(
        {
            "benchmark": "bptt_memory",
            "quick": args.quick,
            "method": METHOD,
            "config": {"preset": preset, "batch": B, "seq": T, "r_low": r_lo, "r_high": r_hi},
            "results": results,
            "ratio_r16_vs_r4_bptt_k4": ratio,
            "ratio_r16_vs_r4_full_backprop": results[f"bptt_k{r_hi}"]["ratio_saved"],
            "goal": "ratio_r16_vs_r4_bptt_k4 <= 1.3",
            "goal_met": ratio <= 1.3,
            "env": environment(),
        }
    )


if __name__ == "__main__":
    main()
