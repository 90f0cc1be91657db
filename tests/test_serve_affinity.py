"""CPU affinity of a tier's engine thread and of the processes a local Ray starts (serve.affinity)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from recursive_model.batching import ContinuousEngine, SamplingParams
from recursive_model.engine import Engine
from recursive_model.recurrence import DecodeSettings
from serve.affinity import cpus_left, format_cpus, parse_cpus, permitted_cpus, resolve_cpus, running_on
from serve.batcher import ReplicaBatcher
from serve.config import ServeConfig, TierConfig
from serve.generation import GenerationRequest
from serve.loading import load_engine
from tests.serve_fixtures import make_tiny_checkpoint

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to choose from"
)


def test_cpu_lists_parse_format_and_name_what_is_wrong() -> None:
    assert parse_cpus("0,2-3") == {0, 2, 3}
    assert parse_cpus(" 5 ") == {5}
    assert format_cpus(parse_cpus("0-2,5,7-8")) == "0-2,5,7-8"
    for bad, says in (
        ("", "bad part ''"),
        ("a", "bad part 'a'"),
        ("-1", "bad part '-1'"),
        ("3-1", "'3-1' is not a range"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_cpus(bad)
    with pytest.raises(ValueError, match="engine_cpus"):
        TierConfig(name="t", r_max=2, engine_cpus="x")
    cfg = ServeConfig.model_validate(
        {"checkpoint": "/x", "tiers": [{"name": "a", "r_max": 2}, {"name": "b", "r_max": 4}]}
    )
    assert [t.engine_cpus for t in cfg.with_engine_cpus("1").tiers] == ["1", "1"]
    with pytest.raises(ValueError, match="engine_cpus"):
        cfg.with_engine_cpus("1-")


@linux_only
def test_cpus_outside_this_machine_or_none_left_are_refused_by_name() -> None:
    beyond = max(permitted_cpus()) + 1
    with pytest.raises(ValueError, match=rf"tier 'a': engine_cpus='{beyond}': CPUs {beyond} are not available here"):
        resolve_cpus("tier 'a': engine_cpus", str(beyond))
    assert resolve_cpus("f", format_cpus(permitted_cpus())) == permitted_cpus()
    with pytest.raises(ValueError, match="reserves every CPU here"):
        cpus_left("engine_cpus", permitted_cpus())


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return load_engine(str(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))).engine


@two_cpus
def test_the_engine_thread_runs_on_its_cpus_and_nothing_else_moves(engine: Engine) -> None:
    mine = frozenset(os.sched_getaffinity(0))
    cpu = frozenset({max(mine)})
    tier = TierConfig(name="t", r_max=2)
    core = ContinuousEngine(engine.model, engine.tokenizer, **tier.engine_options(engine.config.sequence_len))
    pinned = ReplicaBatcher(core, engine_cpus=cpu)
    free = ReplicaBatcher(ContinuousEngine(engine.model, engine.tokenizer, **tier.engine_options(64)))
    try:
        req = GenerationRequest((5, 6, 7), SamplingParams(max_tokens=6, temperature=0.0), DecodeSettings(num_recur=2))
        done = asyncio.run(pinned.generate(req))
        assert done.tokens == asyncio.run(free.generate(req)).tokens  # where it runs changes nothing it computes
        assert pinned.engine_cpus() == cpu
        assert free.engine_cpus() == mine
        assert os.sched_getaffinity(0) == mine  # the caller (the replica's event loop) stays where it was
    finally:
        pinned.close()
        free.close()


@two_cpus
def test_processes_started_in_the_block_run_on_the_cpus_left() -> None:
    mine = frozenset(os.sched_getaffinity(0))
    left = cpus_left("engine_cpus", frozenset({max(mine)}))
    code = "import os; print(sorted(os.sched_getaffinity(0)))"
    with running_on(left):
        inside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert inside.strip() == str(sorted(left))
    assert after.strip() == str(sorted(mine)) and os.sched_getaffinity(0) == mine
    with running_on(None):
        assert os.sched_getaffinity(0) == mine
