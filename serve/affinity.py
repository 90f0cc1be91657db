"""CPU affinity of a tier's engine thread and of the processes a local Ray starts (Linux).

A replica's engine thread computes every step of every request it serves; everything else on a serving node (Serve's
proxy, the ingress, Ray's daemons, the replica's own event loop) does a little work per request or per chunk. Left to
the scheduler, that work often lands on the engine's core: the step waits for the core, and when the
engine thread moves to the other core its caches go cold. On a small node this is much of what serving costs over
the bare engine. With `TierConfig.engine_cpus` the engine thread (and the torch threads it starts) keeps its own
cores; `rnc serve deploy --engine-cpus` also starts the local Ray's processes on the other cores, so none of them
runs on the engine's. On a cluster, start Ray under `taskset -c <other cores> ray start ...` for the same. Measured
on 2 cores at concurrency 8 by `benchmarks/serve_load.py --engine-cpus 1` (docs/LOG.md, 2026-12-07, night).

CPU lists use the kernel's cpuset syntax: "3", "0-3", "0,2-3".
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def parse_cpus(text: str) -> frozenset[int]:
    """The CPU ids of a cpuset-syntax list ("0-3,6"); ValueError saying what is wrong otherwise."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            bad = part.strip()
            raise ValueError(f"{text!r} is not a CPU list like '1', '0-3' or '0,2-3' (bad part {bad!r})") from None
        if first < 0 or last < first:
            raise ValueError(f"{text!r}: {part.strip()!r} is not a range of CPU ids (first <= last, both >= 0)")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpus(cpus: frozenset[int] | set[int]) -> str:
    """The cpuset-syntax form of `cpus` (ranges merged): {0, 1, 2, 5} -> '0-2,5'."""
    parts, ids = [], sorted(cpus)
    while ids:
        first = last = ids.pop(0)
        while ids and ids[0] == last + 1:
            last = ids.pop(0)
        parts.append(str(first) if first == last else f"{first}-{last}")
    return ",".join(parts)


def permitted_cpus() -> frozenset[int]:
    """The CPUs a thread here may be pinned to: the online ones, within this container's cgroup cpuset (v2)."""
    cpus = parse_cpus(Path("/sys/devices/system/cpu/online").read_text().strip())
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                effective = Path("/sys/fs/cgroup", line[3:].lstrip("/"), "cpuset.cpus.effective").read_text().strip()
                if effective:
                    cpus &= parse_cpus(effective)
    except OSError:  # no cgroup v2 cpuset here: every online CPU
        pass
    return cpus


def resolve_cpus(field: str, text: str) -> frozenset[int]:
    """`text` parsed and checked against the CPUs permitted here; the error names `field` and both sets."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError(f"{field}={text!r}: CPU affinity needs Linux (os.sched_setaffinity); leave {field} unset")
    cpus, permitted = parse_cpus(text), permitted_cpus()
    if not cpus <= permitted:
        raise ValueError(
            f"{field}={text!r}: CPUs {format_cpus(cpus - permitted)} are not available here "
            f"(CPUs {format_cpus(permitted)} are)"
        )
    return cpus


def cpus_left(field: str, reserved: frozenset[int]) -> frozenset[int]:
    """The permitted CPUs outside `reserved`: where the rest of a serving node's processes go."""
    left = permitted_cpus() - reserved
    if not left:
        raise ValueError(
            f"{field}={format_cpus(reserved)} reserves every CPU here; leave at least one for Ray's processes, the "
            "proxy and the ingress"
        )
    return left


def pin_current_thread(cpus: frozenset[int]) -> None:
    """Run the calling thread, and the threads and processes it starts from now on, only on `cpus`."""
    os.sched_setaffinity(0, cpus)  # pid 0 = the calling thread (Linux affinity is per thread)
    got = os.sched_getaffinity(0)
    if got != cpus:
        raise RuntimeError(f"asked to run on CPUs {format_cpus(cpus)}, the kernel allows {format_cpus(got)}")


@contextlib.contextmanager
def running_on(cpus: frozenset[int] | None) -> Iterator[None]:
    """Inside the block, the calling thread and the threads and processes it starts (e.g. a local Ray's daemons and
    workers, hence the proxy, the controller and every replica) run on `cpus`; those started keep it after the
    block, unless they pin themselves elsewhere. None: no change."""
    if cpus is None:
        yield
        return
    before = frozenset(os.sched_getaffinity(0))
    pin_current_thread(cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def thread_cpus(thread: threading.Thread) -> frozenset[int]:
    """The CPUs `thread` may run on now (it must be running)."""
    if thread.native_id is None:
        raise ValueError(f"thread {thread.name!r} has not started")
    return frozenset(os.sched_getaffinity(thread.native_id))
