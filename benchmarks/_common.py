"""Shared helpers of the benchmark scripts: argument parsing, interleaved timing, JSON output.

Every script compares variants side by side in one process (A, B, A, B, ... then medians), because absolute times on
a shared CPU machine mean little; only ratios measured this way are reported as results.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    return p


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, called in turn A, B, C, A, B, C, ... so machine noise hits every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-repetition ratios num[i] / den[i] (neighbouring measurements share the machine's state)."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Every weight random: the default init zeroes output projections, which makes decode trivially degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


def emit(result: dict[str, Any]) -> None:
    """The one JSON object a script prints to stdout (logs and warnings go to stderr)."""
    json.dump(result, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
