"""A replica's engine in a child process of its own (serve.engine_process): it answers exactly what an engine on a
thread of the replica answers, runs on the CPUs it is given, in a session of its own that ends with its replica, and
a child that dies or cannot load fails its requests with 503 or the replica's start with the reason. No Ray."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recursive_model.batching import SamplingParams
from recursive_model.recurrence import DecodeSettings, ExitRule
from serve.batcher import EngineSpec, ReplicaBatcher
from serve.config import TierConfig
from serve.generation import Completion, GenerationRequest, StreamChunk
from serve.loading import load_tokenizer_and_config, tier_engine
from serve.router import RequestError
from serve.scoring import ScoreRequest
from tests.serve_fixtures import make_tiny_checkpoint, running, tiny_engine64

TIER = TierConfig(name="wide", r_min=1, r_max=4)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), sequence_len=64)


@pytest.fixture(scope="module")
def spec(ckpt_dir: Path) -> EngineSpec:
    return EngineSpec(functools.partial(tiny_engine64, str(ckpt_dir), TIER), start_timeout_s=120)


def _req(tokenizer: object, text: str, max_tokens: int, r: int, **kw: object) -> GenerationRequest:
    ids = tokenizer.render_for_completion(  # type: ignore[attr-defined]
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    )
    temperature, seed = float(kw.pop("temperature", 0.0)), int(kw.pop("seed", 0))  # type: ignore[arg-type]
    stop = tuple(kw.pop("stop", ()))  # type: ignore[arg-type]
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return GenerationRequest(tuple(ids), sampling, DecodeSettings(num_recur=r, **kw), stop)  # type: ignore[arg-type]


def _run(batcher: ReplicaBatcher, reqs: list[GenerationRequest], streamed: list[bool]) -> list[list[object]]:
    """Every request at once; a streamed one gives its chunks and Completion, another its Completion alone."""

    async def one(req: GenerationRequest, stream: bool) -> list[object]:
        if stream:
            return [ev async for ev in batcher.stream(req)]
        return [await batcher.generate(req)]

    async def run() -> list[list[object]]:
        return await asyncio.wait_for(asyncio.gather(*(one(r, s) for r, s in zip(reqs, streamed, strict=True))), 120)

    return asyncio.run(run())


def _as_data(events: list[object]) -> list[object]:
    """What a consumer sees, without the timing (time to first token)."""
    out: list[object] = []
    for ev in events:
        if isinstance(ev, Completion):
            out.append(("end", ev.finish_reason, ev.prompt_tokens, ev.tokens, ev.recurs, ev.text, ev.stop_token))
        else:
            assert isinstance(ev, StreamChunk)
            out.append(("chunk", ev.tokens, ev.recurs, ev.pieces))
    return out


def test_a_child_process_engine_answers_exactly_what_a_thread_engine_answers(spec: EngineSpec, ckpt_dir: Path) -> None:
    """The same mix of requests (budgets, an adaptive exit, sampling with a seed, a stop string, streamed or not) and
    scoring forwards, through an engine on a thread and one in a child process: the same tokens, recurrences, text
    and log-probabilities (float64, so rounding cannot flip a token; the batch mix may differ between the two)."""
    tokenizer, _ = load_tokenizer_and_config(str(ckpt_dir))
    reqs = [
        _req(tokenizer, "hi", 10, r=1),
        _req(tokenizer, "what is a list comprehension", 12, r=4),
        _req(tokenizer, "tell me a story", 16, r=3, exit=ExitRule(criterion="latent", threshold=1e9)),
        _req(tokenizer, "sample this", 12, r=2, temperature=0.9, seed=7),
        _req(tokenizer, "stop early", 16, r=2, stop=("e",)),
        _req(tokenizer, "and stream this one", 14, r=4),
    ]
    streamed = [False, True, False, True, True, True]
    scores = [ScoreRequest(tuple(reqs[1].prompt), num_recur=3, top_n=2), ScoreRequest((5, 6, 7, 8), num_recur=1)]
    in_thread = ReplicaBatcher.from_spec(spec, process=False)
    in_child = ReplicaBatcher.from_spec(spec, process=True)
    try:
        assert in_child.limits == in_thread.limits
        expected = [_as_data(evs) for evs in _run(in_thread, reqs, streamed)]
        got = [_as_data(evs) for evs in _run(in_child, reqs, streamed)]
        for want, have, stream in zip(expected, got, streamed, strict=True):
            if stream:  # how tokens group into chunks depends on timing; what they carry does not
                assert _streamed(have, 1) == _streamed(want, 1) and "".join(_streamed(have, 3)) == want[-1][5]
            assert have[-1] == want[-1]
        assert any(w[-1][1] == "stop" for w in expected)  # the stop string did cut a completion

        async def score_all(b: ReplicaBatcher) -> list[object]:
            return list(await asyncio.gather(*(b.score(s) for s in scores)))

        assert asyncio.run(score_all(in_child)) == asyncio.run(score_all(in_thread))
        total = sum(len(w[-1][3]) for w in expected)
        # The child's load reaches the front too (its idle snapshot comes after the last output).
        asyncio.run(_until(lambda: in_child.stats().running == 0 and in_child.stats().steps > 0))
        assert in_child.stats().tokens_generated >= total and in_child.stats().scored_tokens == sum(
            len(s.ids) for s in scores
        )
    finally:
        in_thread.close()
        in_child.close()
    assert not in_child.healthy() and in_child._link.proc.returncode == 0  # type: ignore[attr-defined]


def _streamed(events: list[object], field: int) -> list[object]:
    """One field (1 tokens, 3 pieces) of a stream's chunks, concatenated."""
    return [x for ev in events if ev[0] == "chunk" for x in ev[field]]  # type: ignore[index]


async def _until(predicate: object, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_child_engine_runs_on_its_cpus_and_its_helpers_do_not(spec: EngineSpec, ckpt_dir: Path) -> None:
    ours = os.sched_getaffinity(0)
    last = max(ours)
    batcher = ReplicaBatcher.from_spec(
        EngineSpec(spec.factory, engine_cpus=frozenset({last}), start_timeout_s=120), process=True
    )
    try:
        assert batcher.engine_cpus() == {last}
        pid = batcher._link.proc.pid  # type: ignore[attr-defined]
        by_thread = {int(t.name): os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}
        assert by_thread.pop(pid) == {last}  # the child's main thread runs the engine
        assert by_thread and all(cpus == ours for cpus in by_thread.values())  # socket reader, scoring thread
        tokenizer, _ = load_tokenizer_and_config(str(ckpt_dir))
        (events,) = _run(batcher, [_req(tokenizer, "hi", 6, r=2)], [False])
        assert isinstance(events[0], Completion) and events[0].completion_tokens == 6
        assert os.sched_getaffinity(0) == ours
    finally:
        batcher.close()


def test_a_dead_engine_process_fails_its_requests_with_503(spec: EngineSpec, ckpt_dir: Path) -> None:
    """Killed mid-stream: the open stream fails with 503 and Retry-After, the replica reports itself unhealthy (so
    Serve replaces it), and a new request is refused at once instead of hanging."""
    tokenizer, _ = load_tokenizer_and_config(str(ckpt_dir))
    batcher = ReplicaBatcher.from_spec(spec, process=True)
    pid = batcher._link.proc.pid  # type: ignore[attr-defined]

    async def killed_mid_stream() -> list[object]:
        seen: list[object] = []
        async for ev in batcher.stream(_req(tokenizer, "a long answer please", 60, r=4)):
            seen.append(ev)
            if len(seen) == 1:
                os.kill(pid, signal.SIGKILL)
        return seen

    try:
        with pytest.raises(RequestError) as err:
            asyncio.run(asyncio.wait_for(killed_mid_stream(), 60))
        assert err.value.status == 503 and err.value.retry_after_s == spec.retry_after_s
        assert "exited (code -9)" in err.value.message
        assert not batcher.healthy()
        with pytest.raises(RequestError, match="engine stopped") as again:
            asyncio.run(asyncio.wait_for(batcher.generate(_req(tokenizer, "hi", 4, r=1)), 10))
        assert again.value.status == 503
    finally:
        batcher.close()


def test_an_engine_that_cannot_load_fails_the_replica_start_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    spec = EngineSpec(functools.partial(tier_engine, str(missing), None, TIER), start_timeout_s=120)
    with pytest.raises(RuntimeError, match=r"could not load its engine: \w+Error: .*no-such-checkpoint"):
        ReplicaBatcher.from_spec(spec, process=True)


_REPLICA = """
import functools, sys, time
from serve.batcher import EngineSpec, ReplicaBatcher
from serve.config import TierConfig
from tests.serve_fixtures import tiny_engine64

spec = EngineSpec(functools.partial(tiny_engine64, sys.argv[1], TierConfig(name="wide", r_max=4)), start_timeout_s=120)
batcher = ReplicaBatcher.from_spec(spec, process=True)
print(batcher._link.proc.pid, flush=True)
time.sleep(600)
"""


def test_the_engine_process_has_a_session_of_its_own_and_ends_with_its_replica(ckpt_dir: Path) -> None:
    """Its own session (its own scheduling group under Linux autogroup) also puts it out of reach of its replica's
    process-group signals: a replica killed outright, without closing the link, must still take its engine along."""
    root = Path(__file__).resolve().parents[1]
    script = [sys.executable, "-c", _REPLICA, str(ckpt_dir)]
    with subprocess.Popen(script, cwd=root, stdout=subprocess.PIPE, text=True) as replica:  # closes the pipe, reaps
        child = None
        try:
            assert replica.stdout is not None
            child = int(replica.stdout.readline())
            assert os.getsid(child) == child != os.getsid(replica.pid)
            replica.kill()
            replica.wait(30)
            deadline = time.monotonic() + 30
            while running(child):
                assert time.monotonic() < deadline, "the engine process outlived its replica"
                time.sleep(0.05)
        finally:
            replica.kill()
            if child is not None and running(child):
                os.kill(child, signal.SIGKILL)
