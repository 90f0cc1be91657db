"""Serve pieces without Ray: config validation, budget routing into DecodeSettings, request parsing, the replica's
continuous-batching front (ReplicaBatcher over a real ContinuousEngine), checkpoint loading (local and S3 cache), the
Serve config writer and the terminal chat."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml

from checkpoints import CheckpointError, fetch_checkpoint, load_checkpoint
from recursive_model.batching import ContinuousEngine, SamplingParams, StepEvent
from recursive_model.engine import Engine
from recursive_model.recurrence import DecodeSettings, ExitRule
from serve.batcher import EngineSnapshot, ReplicaBatcher
from serve.completions import CompletionPlanner, CompletionStreamFormatter
from serve.config import ServeConfig, TierConfig, load_config
from serve.generation import Completion, GenerationRequest, StreamChunk, TokenDecoder, find_stop
from serve.loading import load_engine, load_tokenizer_and_config, replica_engine
from serve.protocol import parse_chat_request, parse_completion_request, sse
from serve.router import Budget, BudgetRouter, RequestError, merge_budgets, model_budget
from serve.service import ChatPlanner, StreamFormatter, error_response
from tests.serve_fixtures import make_tiny_checkpoint

if TYPE_CHECKING:
    from tests.conftest import S3Bucket

TIERS = [
    {"name": "low", "r_min": 1, "r_max": 2, "kv_cache": "final"},
    {"name": "medium", "r_min": 3, "r_max": 4},
    {"name": "high", "r_min": 5, "r_max": 8, "default_recur": 6, "exit": "kl:0.001:2"},
]


def make_config(**overrides: object) -> ServeConfig:
    return ServeConfig.model_validate({"checkpoint": "/ckpt", "tiers": TIERS, **overrides})


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), sequence_len=64)


@pytest.fixture(scope="module")
def engine(ckpt_dir: Path) -> Engine:
    ckpt = load_checkpoint(ckpt_dir)
    ckpt.model.eval()
    return Engine(ckpt.model, ckpt.tokenizer)


@pytest.fixture(scope="module")
def engine64(engine: Engine) -> Engine:
    """The same weights in float64: equivalence tests compare exact tokens, which float32 rounding may flip."""
    return Engine(copy.deepcopy(engine.model).double(), engine.tokenizer)


# ------------------------------------------------------------------------------------------------------- config
def test_config_defaults_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, checkpoint="s3://b/c")
    assert [t.name for t in cfg.tiers] == ["low", "medium", "high"]
    path = tmp_path / "serve.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "checkpoint": "/x",
                "default_tier": "b",
                "tiers": [{"name": "a", "r_max": 2}, {"name": "b", "r_min": 3, "r_max": 6}],
            }
        )
    )
    cfg = load_config(path, checkpoint="/override")
    assert cfg.checkpoint == "/override" and cfg.default_tier == "b" and cfg.tier("b").recur == 6
    opts = cfg.tier("a").serve_options({"K": "V"})
    assert opts["name"] == "tier-a" and opts["ray_actor_options"]["runtime_env"] == {"env_vars": {"K": "V"}}
    assert opts["autoscaling_config"]["min_replicas"] == 1
    # Serve lets more requests in than the engine queues, so the engine (not Serve) refuses the excess with a 503.
    a = cfg.tier("a")
    assert opts["max_ongoing_requests"] > a.max_running + a.max_waiting
    engine_opts = a.engine_options(sequence_len=64)
    assert (engine_opts["max_recur"], engine_opts["kv_tokens"]) == (2, a.max_running * 64)


def test_replicas_run_handlers_on_the_replica_loop_unless_env_says_otherwise() -> None:
    from serve.app import build_app
    from serve.config import REPLICA_ENV

    flag = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
    assert REPLICA_ENV[flag] == "0"
    cfg = load_config(None, checkpoint="/x", env={"K": "V"})
    ingress = build_app(cfg)._bound_deployment
    tiers = ingress.init_args[1]  # the tier deployments the ingress is bound to
    for dep in [ingress, *(t._bound_deployment for t in tiers.values())]:
        assert dep.ray_actor_options["runtime_env"]["env_vars"] == {flag: "0", "K": "V"}
    assert load_config(None, checkpoint="/x", env={flag: "1"}).replica_env() == {flag: "1"}  # the config wins


def test_tier_exit_rule_reads_spec_or_mapping_and_round_trips() -> None:
    tier = TierConfig(name="a", r_max=8, exit="kl:5e-4:2")
    assert tier.exit == ExitRule(criterion="kl", threshold=5e-4, min_recur=2)
    assert TierConfig.model_validate(tier.model_dump(mode="json")) == tier  # what a replica gets back from Serve
    assert TierConfig(name="a", r_max=8, exit={"criterion": "latent", "threshold": 0.1}).exit.criterion == "latent"
    assert TierConfig(name="a", r_max=8, exit="off").exit is None
    assert tier.decode(5, tier.exit) == DecodeSettings(num_recur=5, kv_cache="exact", exit=tier.exit)


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[1] / "serve" / "serve.example.yaml", checkpoint="s3://b/c")
    assert [t.name for t in cfg.tiers] == ["low", "medium", "high"]
    assert cfg.tier("high").exit == ExitRule(criterion="kl", threshold=5e-4)
    assert BudgetRouter(cfg.tiers, cfg.default_tier).route(Budget(max_recur=12)).tier == "high"


@pytest.mark.parametrize(
    ("tiers", "extra", "field"),
    [
        ([{"name": "a", "r_min": 3, "r_max": 2}], {}, "r_max=2 must be >= r_min=3"),
        ([{"name": "a", "r_max": 2, "kv_cache": "ring:x"}], {}, "tiers[0].kv_cache"),
        ([{"name": "a", "r_max": 2, "autoscaling": {"min_replicas": 3, "max_replicas": 2}}], {}, "max_replicas=2"),
        ([{"name": "a", "r_max": 2, "autoscaling": {"max_replica": 2}}], {}, "tiers[0].autoscaling.max_replica"),
        ([{"name": "a", "r_max": 2}, {"name": "a", "r_max": 3}], {}, "repeated: ['a']"),
        ([{"name": "a", "r_max": 2}], {"default_tier": "zz"}, "default_tier='zz'"),
        ([{"name": "Bad Name", "r_max": 2}], {}, "tiers[0].name"),
        ([{"name": "a", "r_max": 2, "default_recur": 5}], {}, "default_recur=5"),
        ([{"name": "a", "r_max": 2}], {"default_max_tokens": 900}, "default_max_tokens=900"),
        ([{"name": "a", "r_max": 2, "num_cpus": 0}], {}, "tiers[0].num_cpus"),
        ([{"name": "a", "r_max": 2, "exit": "zz:1"}], {}, "tiers[0].exit"),
        ([{"name": "a", "r_max": 2, "exit": "latent:0.1:3"}], {}, "exit.min_recur=3 exceeds r_max=2"),
        ([{"name": "a", "r_max": 2, "exit_threshold": 0.1}], {}, "exit_threshold is replaced by exit"),
        ([{"name": "a", "r_max": 2, "max_batch_size": 8}], {}, "max_batch_size is replaced by max_running"),
        ([{"name": "a", "r_max": 2, "max_waiting": 0}], {}, "tiers[0].max_waiting"),
        (
            [{"name": "a", "r_max": 2, "max_running": 4, "max_waiting": 4, "max_ongoing_requests": 8}],
            {},
            "max_ongoing_requests=8 must be > max_running + max_waiting = 8",
        ),
        ([], {}, "tiers"),
        ([{"name": "a", "r_max": 2}], {"ingress": {"tier_transport": "http"}}, "ingress.tier_transport"),
        ([{"name": "a", "r_max": 2, "engine_cpus": "3-1"}], {}, "tiers[0].engine_cpus"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, tiers: list, extra: dict, field: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"checkpoint": "/x", "tiers": tiers, **extra}))
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert field in str(info.value)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------------- router
def test_router_picks_the_cheapest_tier_that_fits() -> None:
    router = BudgetRouter([TierConfig(**t) for t in TIERS])
    assert router.default_tier == "low"  # cheapest when none is configured
    assert router.route(Budget()).tier == "low"
    assert (router.route(Budget(max_recur=1)).tier, router.route(Budget(max_recur=1)).num_recur) == ("low", 1)
    assert router.route(Budget(max_recur=3)).tier == "medium"
    route = router.route(Budget(max_recur=7))
    assert (route.tier, route.decode) == ("high", DecodeSettings(num_recur=7, exit=ExitRule.parse("kl:0.001:2")))
    assert router.route(Budget(tier="high")).num_recur == 6  # default_recur
    assert router.route(Budget(tier="medium", max_recur=3)).decode == DecodeSettings(num_recur=3)
    # Everything is explicit: the tier's KV strategy, and no exit rule unless the tier or the request sets one.
    assert router.route(Budget()).decode == DecodeSettings(num_recur=2, kv_cache="final", exit=None)


def test_router_overlapping_ranges_prefer_cheap_and_adaptive_exit() -> None:
    router = BudgetRouter([TierConfig(name="deep", r_min=1, r_max=16), TierConfig(name="cheap", r_min=1, r_max=4)])
    assert router.route(Budget(max_recur=3)).tier == "cheap"
    assert router.route(Budget(max_recur=9)).tier == "deep"
    route = router.route(Budget(max_recur=9, exit_threshold=1e-3))
    assert route.decode.exit == ExitRule(criterion="latent", threshold=1e-3, min_recur=1)
    assert router.route(Budget(max_recur=9, exit_threshold=1e-3, exit_criterion="kl")).decode.exit.criterion == "kl"


def test_router_request_exit_settings_over_the_tier_default() -> None:
    router = BudgetRouter([TierConfig(**t) for t in TIERS])
    tier_rule = ExitRule(criterion="kl", threshold=1e-3, min_recur=2)
    assert router.route(Budget(tier="high")).decode.exit == tier_rule
    assert router.route(Budget(tier="high", exit_criterion="kl")).decode.exit == tier_rule
    # The request's threshold keeps the tier's criterion and min_recur; its criterion replaces the tier's.
    assert router.route(Budget(tier="high", exit_threshold=0.5)).decode.exit == ExitRule(
        criterion="kl", threshold=0.5, min_recur=2
    )
    assert router.route(Budget(max_recur=5, exit_threshold=0.5, exit_criterion="latent")).decode.exit == ExitRule(
        criterion="latent", threshold=0.5, min_recur=2
    )
    # min_recur never exceeds the request's r.
    clamp = BudgetRouter([TierConfig(name="a", r_max=8, exit="latent:0.1:4")])
    assert clamp.route(Budget(max_recur=2)).decode.exit == ExitRule(criterion="latent", threshold=0.1, min_recur=2)


@pytest.mark.parametrize(
    ("budget", "param"),
    [
        (Budget(tier="nope"), "tier"),
        (Budget(max_recur=9), "max_recur"),
        (Budget(max_recur=0), "max_recur"),
        (Budget(tier="low", max_recur=4), "max_recur"),
        (Budget(exit_criterion="nope", exit_threshold=0.1), "exit_criterion"),
        (Budget(exit_criterion="kl"), "exit_threshold"),  # the low tier has no kl rule whose threshold could apply
        (Budget(tier="high", exit_criterion="latent"), "exit_threshold"),
    ],
)
def test_router_errors_name_the_field(budget: Budget, param: str) -> None:
    router = BudgetRouter([TierConfig(**t) for t in TIERS])
    with pytest.raises(RequestError) as info:
        router.route(budget)
    assert info.value.param == param and info.value.status == 400
    assert "low [1, 2]" in info.value.message or param != "tier"


def test_router_gap_between_tiers_is_an_error() -> None:
    router = BudgetRouter([TierConfig(name="a", r_max=2), TierConfig(name="b", r_min=5, r_max=8)])
    with pytest.raises(RequestError, match=r"max_recur=3 is out of range.*a \[1, 2\], b \[5, 8\]"):
        router.route(Budget(max_recur=3))


# ---------------------------------------------------------------------------------------- protocol and planner
@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"messages": []}', "messages"),
        (b"{}", "messages"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": 3}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 5}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_recur": -1}', "max_recur"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "exit_threshold": 0}', "exit_threshold"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "exit_criterion": "entropy"}', "exit_criterion"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', "seed"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
        (b'{"messages": [{"role": "assistant", "content": "hi"}]}', "messages"),
    ],
)
def test_parse_errors_name_the_field(body: bytes, param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body)
    assert info.value.param == param, info.value.message
    assert info.value.status == 400


def test_parse_accepts_openai_shapes() -> None:
    req = parse_chat_request(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                ],
                "max_completion_tokens": 5,
                "presence_penalty": 0.1,
                "user": "u1",
                "stream": True,
                "max_recur": 3,
            }
        ).encode()
    )
    assert req.requested_max_tokens() == 5 and req.stream and req.budget() == Budget(max_recur=3)
    assert req.conversation()["messages"][1] == {"role": "user", "content": "hi there"}


def test_planner_limits_and_rendering(engine: Engine) -> None:
    cfg = make_config(model_name="m", max_tokens_limit=32, default_max_tokens=8)
    planner = ChatPlanner(cfg, engine.tokenizer, engine.config.sequence_len)
    msg = [{"role": "user", "content": "hello"}]
    plan = planner.plan(json.dumps({"model": "m", "messages": msg, "max_recur": 7}).encode())
    assert (plan.route.tier, plan.generation.decode.num_recur, plan.generation.sampling.max_tokens) == ("high", 7, 8)
    assert plan.generation.decode is plan.route.decode  # one object from the router to the replica's engine
    assert list(plan.generation.prompt) == engine.tokenizer.render_for_completion(
        {"messages": [*msg, {"role": "assistant", "content": ""}]}
    )
    body = {"messages": msg, "max_recur": 3, "exit_threshold": 0.25, "exit_criterion": "kl", "temperature": 0.5}
    plan = planner.plan(json.dumps({**body, "seed": 11, "top_k": 5}).encode())
    assert plan.generation.decode == DecodeSettings(num_recur=3, exit=ExitRule(criterion="kl", threshold=0.25))
    assert plan.generation.sampling == SamplingParams(max_tokens=8, temperature=0.5, top_k=5, seed=11)
    seeds = {planner.plan(json.dumps(body).encode()).generation.sampling.seed for _ in range(4)}
    assert len(seeds) == 4  # without a seed, each request gets its own random stream
    cases = [
        ({"model": "m", "messages": msg, "max_tokens": 33}, "max_tokens", 400),
        ({"model": "other", "messages": msg}, "model", 404),
        ({"model": "m", "messages": [{"role": "user", "content": "word " * 200}]}, "messages", 400),
        ({"model": "m", "messages": [*msg, {"role": "user", "content": "x"}]}, "messages", 400),
        ({"model": "m", "messages": msg, "tier": "nope"}, "tier", 400),
    ]
    for body, param, status in cases:
        with pytest.raises(RequestError) as info:
            planner.plan(json.dumps(body).encode())
        assert (info.value.param, info.value.status) == (param, status), info.value.message
    models = planner.models()["data"][0]
    assert [t["name"] for t in models["tiers"]] == ["low", "medium", "high"] and models["context_length"] == 64


def test_stream_formatter_chunks_parse_back() -> None:
    cfg = make_config(model_name="m")
    plan = ChatPlanner(cfg, _FakeTokenizer(), 64).plan(b'{"messages": [{"role": "user", "content": "hi"}]}')
    fmt = StreamFormatter(plan, "m")
    raw = (
        fmt.start()
        + fmt.event(StreamChunk([1, 2], [2, 1], ["a", "b"]))
        + fmt.event(Completion("stop", 3, 2, [2, 1], "ab"))
    )
    events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    first, content, last = (json.loads(e) for e in events[:-1])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content["choices"][0]["delta"]["content"] == "ab" and content["recurrence"]["per_token"] == [2, 1]
    assert content["token_text"] == ["a", "b"] and content["tier"] == "low"
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["completion_tokens"] == 2
    assert last["recurrence"] == {"budget": 2, "mean": 1.5}


class _FakeTokenizer:
    def render_for_completion(self, conversation: dict) -> list[int]:
        return [1, 2, 3]


def test_error_response_tells_when_to_retry() -> None:
    body, status, headers = error_response(RequestError(None, "full", status=503, retry_after_s=2))
    assert (status, headers, body["error"]["message"]) == (503, {"Retry-After": "2"}, "full")
    assert error_response(RequestError("max_tokens", "too many"))[1:] == (400, {})


# ------------------------------------------------------------------------------------------- replica batcher
def test_token_decoder_holds_back_split_characters(engine: Engine) -> None:
    tok = engine.tokenizer
    ids = tok.encode("é 日本 👍")
    byte_ids = [b for ch in "日" for b in ch.encode()]  # single-byte tokens 0..255 are their bytes
    dec = TokenDecoder(tok)
    pieces = [dec.piece(i) for i in byte_ids] + [dec.flush()]
    assert pieces[:2] == ["", ""] and "".join(pieces) == "日"
    assert _decode(tok, ids) == "é 日本 👍"


class _SteppedEngine:
    """A real ContinuousEngine that records every step's events; while `gated`, each step waits for `allow()`."""

    def __init__(self, engine: ContinuousEngine, gated: bool = False, script: list[int] | None = None):
        self._engine = engine
        self._permits = threading.Semaphore(0)
        self.gated = gated
        self.steps: list[list[StepEvent]] = []
        self.script = script  # token ids reported in place of the sampled ones, one per step (a single row)

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def ungate(self) -> None:
        self.gated = False
        self._permits.release()  # the step that may be waiting

    def step(self) -> list[StepEvent]:
        if self.gated:
            self._permits.acquire()
        events = self._engine.step()
        if self.script is not None:
            for ev in events:
                if ev.step is not None:
                    ev.step.token = self.script[len(self.steps)]
        self.steps.append(events)
        return events


def _batcher(
    eng: Engine, tier: TierConfig, gated: bool = False, script: list[int] | None = None, **kw: object
) -> tuple[ReplicaBatcher, _SteppedEngine]:
    """A replica's batcher over a real engine built from `tier`, as serve.app.TierModel builds it."""
    core = ContinuousEngine(eng.model, eng.tokenizer, **tier.engine_options(eng.config.sequence_len))
    stepped = _SteppedEngine(core, gated, script)
    return ReplicaBatcher(stepped, retry_after_s=tier.retry_after_s, **kw), stepped  # type: ignore[arg-type]


def _req(
    eng: Engine, text: str, max_tokens: int = 8, r: int = 2, temperature: float = 0.0, seed: int = 0, **decode: object
) -> GenerationRequest:
    ids = eng.tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    )
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return GenerationRequest(tuple(ids), sampling, DecodeSettings(num_recur=r, **decode))  # type: ignore[arg-type]


def _generate_all(batcher: ReplicaBatcher, reqs: list[GenerationRequest]) -> list[Completion]:
    async def run() -> list[Completion]:
        return await asyncio.wait_for(asyncio.gather(*(batcher.generate(r) for r in reqs)), 60)

    return asyncio.run(run())


def _decode(tokenizer: object, ids: list[int]) -> str:
    """Text as the batcher streams it (incrementally, a split character as U+FFFD)."""
    dec = TokenDecoder(tokenizer)
    return "".join([dec.piece(i) for i in ids] + [dec.flush()])


WIDE = TierConfig(name="wide", r_min=1, r_max=4)


def test_requests_batched_together_return_exactly_what_they_return_alone(engine64: Engine) -> None:
    """Concurrent requests with different r, exit rules, temperatures, seeds and lengths share the replica's engine
    steps, and each returns exactly what it returns alone (float64, so rounding cannot flip a token)."""
    reqs = [
        _req(engine64, "hi", 10, r=1),
        _req(engine64, "what is a list comprehension", 12, r=4),
        _req(engine64, "tell me more about python dictionaries please", 9, r=3, exit=ExitRule.parse("latent:1e9:2")),
        _req(engine64, "x", 11, r=4, exit=ExitRule.parse("kl:1e9")),
        _req(engine64, "sample me", 10, r=2, temperature=0.9, seed=7),
        _req(engine64, "sample me", 10, r=2, temperature=0.9, seed=8),
    ]
    batcher, core = _batcher(engine64, WIDE)
    together = _generate_all(batcher, reqs)
    # all running together at some step (a deep row's token may span several steps: min_step_recur)
    spans: dict[int, list[int]] = {}
    for i, step in enumerate(core.steps):
        for ev in step:
            spans.setdefault(ev.seq_id, [i, i])[1] = i
    assert max(sum(a <= i <= b for a, b in spans.values()) for i in range(len(core.steps))) == len(reqs)
    for req, got in zip(reqs, together, strict=True):
        alone = _generate_all(_batcher(engine64, WIDE)[0], [req])[0]
        assert (got.text, got.recurs, got.finish_reason) == (alone.text, alone.recurs, alone.finish_reason)
        assert got.completion_tokens == len(got.recurs) <= req.sampling.max_tokens
        if req.sampling.temperature == 0:  # and what the one-shot Engine gives it
            ref = engine64.generate_batch(
                [list(req.prompt)], max_tokens=req.sampling.max_tokens, temperature=0.0, decode=req.decode
            )[0]
            assert (got.text, got.recurs) == (_decode(engine64.tokenizer, ref.tokens), ref.recurs)
    assert together[4].text != together[5].text  # the seed, not the batch, decides what is sampled
    assert together[2].recurs[1:] == [2] * (len(together[2].recurs) - 1)  # exit rule: min_recur, then converged


def test_stream_chunks_add_up_and_budgets_are_per_request(engine: Engine) -> None:
    batcher, _ = _batcher(engine, WIDE)

    async def run() -> list[list[StreamChunk | Completion]]:
        async def collect(req: GenerationRequest) -> list[StreamChunk | Completion]:
            return [ev async for ev in batcher.stream(req)]

        reqs = [_req(engine, "a", 10, r=1), _req(engine, "b", 10, r=3), _req(engine, "c", 10, r=1)]
        return await asyncio.gather(*(collect(r) for r in reqs))

    for events, r in zip(asyncio.run(run()), (1, 3, 1), strict=True):
        *chunks, end = events
        assert isinstance(end, Completion) and all(isinstance(c, StreamChunk) for c in chunks)
        assert "".join(c.text for c in chunks) == end.text
        assert [x for c in chunks for x in c.recurs] == end.recurs == [r] * end.completion_tokens


def _stream_all(batcher: ReplicaBatcher, reqs: list[GenerationRequest]) -> list[list[StreamChunk | Completion]]:
    async def run() -> list[list[StreamChunk | Completion]]:
        async def collect(req: GenerationRequest) -> list[StreamChunk | Completion]:
            return [ev async for ev in batcher.stream(req)]

        return await asyncio.wait_for(asyncio.gather(*(collect(r) for r in reqs)), 60)

    return asyncio.run(run())


def test_a_streamed_token_ending_inside_a_character_waits_for_its_text(engine: Engine) -> None:
    """Each chunk carries one text piece per token. A token whose bytes end inside a character is held back until
    the next token completes it, or, at the end, until its text is known to be U+FFFD; it is never sent as a token
    with an empty piece followed by a chunk of text with no token."""
    tok = engine.tokenizer
    byte_id = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    word, lead, tail = byte_id[b"o"], byte_id[b"\xc3"], byte_id[b"\xa9"]  # b"\xc3\xa9" is "\u00e9"
    for script, text in (([word, lead, tail, word, lead], "o\u00e9o\ufffd"), ([lead], "\ufffd")):
        batcher, _ = _batcher(engine, WIDE, script=script)
        *chunks, end = _stream_all(batcher, [_req(engine, "hi", len(script), r=1)])[0]
        assert isinstance(end, Completion) and end.text == text and end.completion_tokens == len(script)
        assert all(isinstance(c, StreamChunk) and len(c.tokens) == len(c.pieces) == len(c.recurs) for c in chunks)
        pieces = [p for c in chunks for p in c.pieces]  # type: ignore[union-attr]
        assert "".join(pieces) == text and len(pieces) == len(script)
        assert pieces[-1].endswith("\ufffd")


def test_open_streams_share_the_replicas_chunk_budget(engine: Engine) -> None:
    """stream_chunks_per_s is shared by the open streams: four streams on a budget of 0.1 chunks/s may send a chunk
    every 40 s each, so each gets its first token at once and the rest merged into one chunk when it ends (the end
    does not wait out the interval); without a budget a stream gets a chunk as tokens come. The engine thread holds
    the tokens in between: the event loop is woken for the chunks, not for every token. The last chunk and the
    Completion travel as one item of `stream_batches`."""
    reqs = [_req(engine, f"prompt {i}", 12, r=1) for i in range(4)]
    budgeted, _ = _batcher(engine, WIDE, stream_chunks_per_s=0.1)
    free, free_core = _batcher(engine, WIDE)
    wakeups = []
    deliver = budgeted._deliver
    budgeted._deliver = lambda items: (wakeups.append(len(items)), deliver(items))  # type: ignore[method-assign]
    for events in _stream_all(budgeted, reqs):
        *chunks, end = events
        assert isinstance(end, Completion) and end.completion_tokens == 12
        assert len(chunks) <= 2 and max(len(c.tokens) for c in chunks) >= 6  # (the first token may come alone)
        assert "".join(c.text for c in chunks) == end.text
    assert budgeted._link.loop._streams == 0  # type: ignore[attr-defined]  # every stream's count given back
    assert 1 <= len(wakeups) <= 2 * len(reqs)  # a first chunk and an end per stream at most (not one per step)

    async def all_batches() -> list[list[list[StreamChunk | Completion]]]:
        async def of(req: GenerationRequest) -> list[list[StreamChunk | Completion]]:
            return [b async for b in budgeted.stream_batches(req)]

        return await asyncio.wait_for(asyncio.gather(*map(of, reqs)), 60)

    for batches in asyncio.run(all_batches()):
        *head, last = batches
        assert len(head) <= 1 and all(len(b) == 1 and isinstance(b[0], StreamChunk) for b in head)
        assert [type(e) for e in last] == [StreamChunk, Completion]  # the rest of the tokens, and the end, at once
    (*chunks, end), = _stream_all(free, reqs[:1])
    assert len(chunks) > 2 and "".join(c.text for c in chunks) == end.text
    with pytest.raises(ValueError, match="stream_chunks_per_s"):
        TierConfig(name="t", stream_chunks_per_s=0)
    with pytest.raises(ValueError, match="stream_chunks_per_s=-1"):
        ReplicaBatcher(free_core, stream_chunks_per_s=-1)  # type: ignore[arg-type]


def test_adaptive_exit_spends_fewer_recurrences(engine: Engine) -> None:
    req = _req(engine, "hello", 12, r=4, exit=ExitRule(criterion="latent", threshold=1e9))
    (done,) = _generate_all(_batcher(engine, WIDE)[0], [req])
    # every token exits after one recurrence, the first too: the last prompt token is decoded with the exit rule
    assert set(done.recurs) == {1} and done.mean_recur < 4


def test_a_long_prompt_never_cuts_a_short_request_short(engine: Engine) -> None:
    seq = engine.config.sequence_len
    long_req = GenerationRequest(
        (engine.bos, *[300] * (seq - 5)), SamplingParams(max_tokens=4, temperature=0.0), DecodeSettings(num_recur=2)
    )
    short_req = _req(engine, "hi", 20)
    long_done, short_done = _generate_all(_batcher(engine, WIDE)[0], [long_req, short_req])
    assert long_done.completion_tokens <= 4
    alone = engine.generate_batch([list(short_req.prompt)], max_tokens=20, temperature=0.0, num_recur=2)[0]
    assert short_done.text == _decode(engine.tokenizer, alone.tokens)
    assert short_done.completion_tokens == len(alone.tokens)


def test_a_full_queue_is_refused_at_once_with_retry_after(engine: Engine) -> None:
    """One row and one waiting slot: of three concurrent requests at least one is refused (503, Retry-After) while
    the first still runs, and every request ends (no hang)."""
    tier = TierConfig(name="tight", r_max=2, max_running=1, max_waiting=1, retry_after_s=3)
    batcher, _ = _batcher(engine, tier)

    async def run() -> list[tuple[str, float]]:
        t0 = asyncio.get_running_loop().time()

        async def one(i: int) -> tuple[str, float]:
            try:
                await batcher.generate(_req(engine, f"request {i}", 30))
                outcome = "ok"
            except RequestError as exc:
                assert (exc.status, exc.retry_after_s) == (503, 3)
                outcome = "refused"
            return outcome, asyncio.get_running_loop().time() - t0

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3))), 60)

    results = asyncio.run(run())
    refused = [t for o, t in results if o == "refused"]
    ok = [t for o, t in results if o == "ok"]
    assert refused and ok and max(refused) < min(ok)
    assert batcher.stats().rejected == len(refused)


def test_a_cancelled_stream_frees_its_row_at_the_next_step(engine: Engine) -> None:
    batcher, core = _batcher(engine, WIDE, gated=True, stats_interval_s=0.0)

    async def wait_steps(n: int) -> None:
        while batcher.stats().steps < n:
            await asyncio.sleep(0.002)

    async def run() -> None:
        gen = batcher.stream(_req(engine, "hi", 40))
        first = asyncio.ensure_future(gen.__anext__())
        core.allow()  # the prefill step: the first token (one that ends inside a character waits for the next)
        while not (await asyncio.wait([first], timeout=0.5))[0]:
            core.allow()
        assert isinstance(first.result(), StreamChunk)
        await wait_steps(1)  # the snapshot is published right after the step's tokens went out
        assert batcher.stats().running == 1 and batcher.stats().kv_blocks_used > 0
        await gen.aclose()  # the client went away
        steps_at_close = batcher.stats().steps
        for extra in (1, 2):  # the engine may already be inside one more step when the cancel arrives
            core.allow()
            await wait_steps(steps_at_close + extra)
            if batcher.stats().running == 0:
                break
        assert batcher.stats().running == 0 and batcher.stats().kv_blocks_used == 0
        reasons = [ev.finish_reason for step in core.steps for ev in step if ev.finished]
        assert reasons == ["cancelled"]
        core.ungate()  # the replica keeps serving
        done = await asyncio.wait_for(batcher.generate(_req(engine, "again", 3)), 30)
        assert done.completion_tokens <= 3

    try:
        asyncio.run(run())
    finally:
        core.ungate()  # never leave the engine thread blocked


def test_requests_that_cannot_run_are_request_errors_naming_the_field(engine: Engine) -> None:
    tier = TierConfig(name="small", r_max=2, kv_tokens=32)
    batcher, _ = _batcher(engine, tier)
    cases = [
        (GenerationRequest(tuple(range(1, 70)), SamplingParams(max_tokens=4), DecodeSettings(num_recur=2)), "messages"),
        (_req(engine, "hi", 4, r=3), "max_recur"),  # deeper than the tier's r_max
        (_req(engine, "hi", 40), "max_tokens"),  # prompt + max_tokens exceed the 32-token KV pool
    ]

    async def run() -> None:
        for req, param in cases:
            with pytest.raises(RequestError) as info:
                await batcher.generate(req)
            assert (info.value.param, info.value.status) == (param, 400), info.value.message
        assert (await batcher.generate(_req(engine, "ok", 4))).completion_tokens <= 4

    asyncio.run(run())
    assert batcher.healthy()


def test_a_failing_engine_fails_its_requests_and_the_replica_turns_unhealthy(engine: Engine) -> None:
    batcher, core = _batcher(engine, WIDE)

    def broken_step() -> list[StepEvent]:
        raise RuntimeError("device lost")

    core.step = broken_step  # type: ignore[method-assign]

    async def run() -> None:
        with pytest.raises(RequestError) as info:
            await asyncio.wait_for(batcher.generate(_req(engine, "hi", 4)), 30)
        assert info.value.status == 503 and "device lost" in info.value.message
        with pytest.raises(RequestError):  # refused at once from now on
            await asyncio.wait_for(batcher.generate(_req(engine, "again", 4)), 5)

    asyncio.run(run())
    assert not batcher.healthy()


class _RecordingMetrics:
    def __init__(self) -> None:
        self.loads: list[tuple[EngineSnapshot, float, float]] = []
        self.requests: list[Completion] = []
        self.scored: list[tuple[int, int]] = []

    def engine_load(self, snapshot: EngineSnapshot, tokens_per_s: float, mean_recur: float) -> None:
        self.loads.append((snapshot, tokens_per_s, mean_recur))

    def request_finished(self, completion: Completion) -> None:
        self.requests.append(completion)

    def tokens_scored(self, tokens: int, num_recur: int) -> None:
        self.scored.append((tokens, num_recur))


def test_metrics_sink_sees_engine_load_and_requests(engine: Engine) -> None:
    metrics = _RecordingMetrics()
    batcher, _ = _batcher(engine, WIDE, metrics=metrics, stats_interval_s=0.0)
    done = _generate_all(batcher, [_req(engine, str(i), 6, r=3) for i in range(3)])
    batcher.close()  # joins the engine thread: its report after the last step is in
    assert sorted(c.completion_tokens for c in metrics.requests) == sorted(c.completion_tokens for c in done)
    assert all(c.first_token_s > 0 for c in metrics.requests)
    assert max(s.running for s, _, _ in metrics.loads) == 3
    assert max(s.kv_blocks_used for s, _, _ in metrics.loads) > 0
    busy = [(tps, r) for s, tps, r in metrics.loads if tps > 0]
    assert busy and all(r == 3 for _, r in busy)  # every token ran r = 3 recurrences
    idle, _, _ = metrics.loads[-1]
    assert (idle.running, idle.waiting, idle.kv_blocks_used) == (0, 0, 0)
    assert idle.kv_blocks_total == batcher.limits.kv_blocks


# ------------------------------------------------------------------------------------- /v1/completions, model ids
def test_model_ids_name_a_budget_and_conflicts_name_both_fields() -> None:
    assert model_budget(None, "m") == model_budget("m", "m") == Budget()
    assert model_budget("m:high", "m") == Budget(tier="high")
    assert model_budget("m@r8", "m") == Budget(max_recur=8)
    assert model_budget("m:high@r7", "m") == Budget(tier="high", max_recur=7)
    for bad in ("other", "m:", "mx@r3", "other:high"):
        with pytest.raises(RequestError) as info:
            model_budget(bad, "m")
        assert (info.value.param, info.value.status, info.value.code) == ("model", 404, "model_not_found")
    # The body adds to the model id's budget; the same field with two values is refused, naming both.
    assert merge_budgets("m:high", Budget(tier="high"), Budget(max_recur=7, exit_threshold=0.5)) == Budget(
        tier="high", max_recur=7, exit_threshold=0.5
    )
    with pytest.raises(RequestError, match=r"model='m:high' asks for tier='high' but the request sets tier='low'"):
        merge_budgets("m:high", Budget(tier="high"), Budget(tier="low"))
    with pytest.raises(RequestError, match=r"max_recur=8 but the request sets max_recur=4") as info:
        merge_budgets("m@r8", Budget(max_recur=8), Budget(max_recur=4))
    assert info.value.param == "model" and info.value.status == 400


def test_planners_route_by_model_id_and_models_lists_every_budget(engine: Engine) -> None:
    cfg = make_config(model_name="m")
    chat = ChatPlanner(cfg, engine.tokenizer, engine.config.sequence_len)
    msg = [{"role": "user", "content": "hi"}]
    for model, tier, r in (("m", "low", 2), ("m:high", "high", 6), ("m@r3", "medium", 3), ("m@r7", "high", 7)):
        plan = chat.plan(json.dumps({"model": model, "messages": msg}).encode())
        assert (plan.route.tier, plan.generation.decode.num_recur) == (tier, r), model
    plan = chat.plan(json.dumps({"model": "m:high", "messages": msg, "max_recur": 5}).encode())
    assert (plan.route.tier, plan.route.num_recur) == ("high", 5)  # the body's r inside the model id's tier
    with pytest.raises(RequestError) as info:
        chat.plan(json.dumps({"model": "m:high", "messages": msg, "tier": "low"}).encode())
    assert info.value.param == "model" and "tier='low'" in info.value.message
    with pytest.raises(RequestError) as info:
        chat.plan(json.dumps({"model": "m:low@r5", "messages": msg}).encode())
    assert info.value.param == "max_recur"  # the router's range check still applies
    ids = [m["id"] for m in chat.models()["data"]]
    assert ids == ["m", "m:low", "m:medium", "m:high", *(f"m@r{r}" for r in range(1, 9))]
    by_id = {m["id"]: m for m in chat.models()["data"]}
    assert (by_id["m@r4"]["tier"], by_id["m:high"]["recur"]) == ("medium", 6)
    completions = CompletionPlanner(cfg, engine.tokenizer, engine.config.sequence_len)
    plan = completions.plan(b'{"model": "m@r4", "prompt": "hi", "max_tokens": 2}')
    assert (plan.route.tier, plan.prompts[0].generation.decode.num_recur) == ("medium", 4)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], "x", 3]}, "prompt[2]"),
        ({"prompt": [[1, 2], []]}, "prompt[1]"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # generates nothing unless the prompt is echoed
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": ["x", "y"], "stream": True}, "prompt"),
        ({"prompt": "x", "stream": True, "logprobs": 1}, "logprobs"),
        ({"prompt": [1, 2, 9999]}, "prompt[2]"),  # outside the vocabulary
        ({"prompt": [[1], [1, -1]]}, "prompt[1][1]"),
        ({"prompt": ["x", "word " * 80]}, "prompt[1]"),  # longer than the context
        ({"prompt": "x", "model": "m:high", "tier": "low"}, "model"),
        ({"prompt": "x", "model": "gpt-4"}, "model"),
        ({"prompt": "x", "max_recur": 99}, "max_recur"),
    ],
)
def test_completion_request_errors_name_the_field(engine: Engine, body: dict, param: str) -> None:
    cfg = make_config(model_name="m", max_tokens_limit=64, default_max_tokens=16)
    planner = CompletionPlanner(cfg, engine.tokenizer, 64)
    with pytest.raises(RequestError) as info:
        planner.plan(json.dumps(body).encode())
    assert info.value.param == param, info.value.message
    assert info.value.status == (404 if body.get("model") == "gpt-4" else 400)


def test_completion_prompt_shapes() -> None:
    def prompts(prompt: object) -> list:
        return parse_completion_request(json.dumps({"prompt": prompt}).encode()).prompts

    assert prompts("a b") == ["a b"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([5, 6]) == [[5, 6]]
    assert prompts([[5, 6], [7]]) == [[5, 6], [7]]
    assert prompts(["a", [7]]) == ["a", [7]]


def _complete(planner: CompletionPlanner, batcher: ReplicaBatcher, body: dict) -> dict:
    """What the ingress does with a /v1/completions body, with the replica's batcher in place of its handle."""
    plan = planner.plan(json.dumps(body).encode())

    async def run() -> list:
        return await asyncio.wait_for(asyncio.gather(*(planner.run(plan, p, batcher) for p in plan.prompts)), 60)

    return planner.response(plan, asyncio.run(run()))


@pytest.fixture
def completer(engine: Engine) -> tuple[CompletionPlanner, ReplicaBatcher]:
    cfg = make_config(model_name="m", max_tokens_limit=64, default_max_tokens=16)
    batcher = _batcher(engine, WIDE, metrics=_RecordingMetrics())[0]
    return CompletionPlanner(cfg, engine.tokenizer, engine.config.sequence_len), batcher


def test_loglikelihood_request_is_one_forward_with_the_openai_logprobs_layout(
    engine: Engine, completer: tuple[CompletionPlanner, ReplicaBatcher]
) -> None:
    """lm-eval's loglikelihood request: echo, logprobs, one greedy token. It never reaches the engine: one forward at
    the model id's r gives every prompt token's log p, the top-n, and the answer token (the argmax)."""
    planner, batcher = completer
    tok = engine.tokenizer
    prompts = [tok.encode("hello world, the list", prepend="<|bos|>"), [tok.bos_token_id, *tok.encode("x = 1")]]
    body = {"model": "m@r3", "prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0}
    out = _complete(planner, batcher, body)
    assert batcher.stats().steps == 0 and batcher.stats().scored_tokens == sum(map(len, prompts))
    assert batcher.stats().scored_recurrences == 3 * sum(map(len, prompts))
    assert sorted(batcher.metrics.scored) == sorted((len(p), 3) for p in prompts)  # type: ignore[union-attr]
    assert (out["object"], out["model"], out["tier"], out["recurrence"]["budget"]) == (
        "text_completion",
        "m@r3",
        "medium",
        3,
    )
    n = sum(map(len, prompts))
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}
    for ids, choice in zip(prompts, out["choices"], strict=True):
        lp = choice["logprobs"]
        with torch.no_grad():
            ref = torch.log_softmax(engine.model(torch.tensor([ids]), num_recur=3)[0], dim=-1)  # (T, V)
        answer = int(ref[-1].argmax())
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = [float(ref[t - 1, token]) for t, token in enumerate([*ids, answer]) if t > 0]
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
        for t, top in enumerate(lp["top_logprobs"][1:], start=1):
            best = ref[t - 1].topk(2)
            assert lp["tokens"][t] in top and 2 <= len(top) <= 3  # the top 2 plus the token itself
            assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-5)
        # Offsets index the returned text: prompt (echoed) + the completion.
        assert choice["text"] == "".join(lp["tokens"]) and choice["text"].startswith(tok.decode(ids))
        ends = [*lp["text_offset"][1:], len(choice["text"])]
        assert [choice["text"][a:b] for a, b in zip(lp["text_offset"], ends, strict=True)] == lp["tokens"]
        assert choice["recurrence"]["per_token"] == [3] and choice["finish_reason"] == "length"


def test_lm_eval_reads_the_loglikelihood_layout(completer: tuple[CompletionPlanner, ReplicaBatcher]) -> None:
    api = pytest.importorskip("lm_eval.models.openai_completions", reason="needs the eval extra")
    planner, batcher = completer
    ids = [planner.tokenizer.bos_token_id, *planner.tokenizer.encode("a b c d")]
    body = {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    out = _complete(planner, batcher, body)
    ctxlen = 3  # the continuation is ids[3:]
    ((ll, greedy),) = api.LocalCompletionsAPI.parse_logprobs(out, tokens=[ids], ctxlens=[ctxlen])
    token_logprobs = out["choices"][0]["logprobs"]["token_logprobs"]
    assert ll == pytest.approx(sum(token_logprobs[ctxlen : len(ids)]))
    assert isinstance(greedy, bool)


def test_echo_with_max_tokens_0_scores_the_prompt_only(completer: tuple[CompletionPlanner, ReplicaBatcher]) -> None:
    planner, batcher = completer
    out = _complete(planner, batcher, {"prompt": "hello there", "echo": True, "max_tokens": 0, "logprobs": 0})
    (choice,) = out["choices"]
    ids = planner.tokenizer.encode("hello there", prepend="<|bos|>")  # a text prompt starts with <|bos|>
    assert choice["text"] == planner.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids) and out["usage"]["completion_tokens"] == 0
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])  # logprobs=0: the token alone
    plain = _complete(planner, batcher, {"prompt": "hello there", "echo": True, "max_tokens": 0})
    assert plain["choices"][0]["text"] == choice["text"] and plain["choices"][0]["logprobs"] is None
    assert batcher.stats().steps == 0


def test_generated_completion_stop_strings_and_its_logprobs(
    engine: Engine, completer: tuple[CompletionPlanner, ReplicaBatcher]
) -> None:
    planner, batcher = completer
    tok = engine.tokenizer
    ids = tok.encode("the list comprehension", prepend="<|bos|>")
    out = _complete(planner, batcher, {"prompt": [ids], "max_tokens": 10, "temperature": 0, "model": "m@r3"})
    ref = engine.generate_batch([ids], max_tokens=10, temperature=0.0, num_recur=3, exit=None)[0]
    (choice,) = out["choices"]
    assert choice["text"] == _decode(tok, ref.tokens) and choice["recurrence"]["per_token"] == ref.recurs
    text = choice["text"]
    assert len(text) > 4
    stop = text[3:5]  # a stop string that starts inside the completion: the text ends right before it
    cut = _complete(
        planner, batcher, {"prompt": [ids], "max_tokens": 10, "temperature": 0, "stop": [stop, "\x00"], "model": "m@r3"}
    )
    assert cut["choices"][0]["text"] == text[: text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < out["usage"]["completion_tokens"]
    # Log-probabilities of generated tokens: the full forward at r over prompt + completion.
    scored = _complete(
        planner, batcher, {"prompt": [ids], "max_tokens": 10, "temperature": 0, "logprobs": 1, "model": "m@r3"}
    )
    lp = scored["choices"][0]["logprobs"]
    full = [*ids, *ref.tokens]
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([full]), num_recur=3)[0], dim=-1)
    expected = [float(logp[len(ids) + i - 1, t]) for i, t in enumerate(ref.tokens)]
    assert lp["token_logprobs"][: len(ref.tokens)] == pytest.approx(expected, abs=1e-5)
    assert lp["text_offset"][0] == 0
    # Sampling follows the seed.
    body = {"prompt": "x", "max_tokens": 8, "temperature": 1.0, "seed": 5, "model": "m@r4"}
    assert _complete(planner, batcher, body)["choices"] == _complete(planner, batcher, body)["choices"]


def test_a_streamed_completion_holds_back_what_may_become_a_stop_string(engine: Engine) -> None:
    batcher, _ = _batcher(engine, WIDE)
    plain = _generate_all(batcher, [_req(engine, "hello", 12)])[0]
    assert len(plain.text) > 6
    for stop in (plain.text[4:7], plain.text[-2:], "\x00never"):
        req = dataclasses.replace(_req(engine, "hello", 12), stop=(stop,))

        async def collect(req: GenerationRequest = req) -> list:
            return [ev async for ev in batcher.stream(req)]

        *chunks, end = asyncio.run(collect())
        streamed = "".join(c.text for c in chunks)
        expected = plain.text.split(stop)[0] if stop in plain.text else plain.text
        assert streamed == end.text == expected, stop
        assert end.finish_reason == ("stop" if stop in plain.text else plain.finish_reason)
        assert [r for c in chunks for r in c.recurs] == end.recurs and len(end.tokens) == len(end.recurs)


def test_completion_stream_chunks_parse_back(engine: Engine) -> None:
    planner = CompletionPlanner(make_config(model_name="m"), engine.tokenizer, engine.config.sequence_len)
    plan = planner.plan(b'{"model": "m@r4", "prompt": "hi", "stream": true, "echo": true, "max_tokens": 3}')
    fmt = CompletionStreamFormatter(planner, plan)
    raw = (
        fmt.start() + fmt.event(StreamChunk([1, 2], [4, 4], ["a", "b"])) + fmt.event(Completion("length", 2, 2, [4, 4]))
    )
    events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    echo, content, last = (json.loads(e) for e in events[:-1])
    assert echo["choices"][0]["text"] == engine.tokenizer.decode(list(plan.prompts[0].ids))  # "<|bos|>hi"
    assert (content["object"], content["choices"][0]["text"], content["recurrence"]) == (
        "text_completion",
        "ab",
        {"per_token": [4, 4]},
    )
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 2
    assert (last["recurrence"], last["tier"], last["model"]) == ({"budget": 4, "mean": 4.0}, "medium", "m@r4")


def test_find_stop() -> None:
    assert find_stop("abcdef", ("cd",)) == (2, 0)
    assert find_stop("abcdef", ("cd", "b")) == (1, 0)
    assert find_stop("abc", ("cde",)) == (None, 1) and find_stop("abcd", ("cdx",)) == (None, 2)
    assert find_stop("abc", ("x",)) == (None, 0)
    assert find_stop("abcabc", ("ab",), start=1) == (3, 0)


# ---------------------------------------------------------------------------------------------------- loading
def test_load_local_checkpoint_verifies_the_manifest(ckpt_dir: Path, tmp_path: Path) -> None:
    loaded = load_engine(str(ckpt_dir))
    assert loaded.config.sequence_len == 64 and not loaded.engine.model.training
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt_dir, bad)
    (bad / "config.json").write_text((bad / "config.json").read_text() + " ")
    with pytest.raises(CheckpointError, match="config.json"):
        load_engine(str(bad))
    with pytest.raises(CheckpointError, match="no such directory"):
        load_engine(str(tmp_path / "missing"))


def test_a_replica_runs_on_its_tiers_device_with_decode_compiled_when_asked(ckpt_dir: Path) -> None:
    tier = TierConfig(name="t", r_max=3, max_running=2, kv_tokens=256)
    loaded, engine = replica_engine(str(ckpt_dir), None, tier)
    model = loaded.engine.model
    assert engine.model is model and engine.max_recur == 3 and engine.pool.num_blocks * engine.pool.block_size == 256
    assert model._fixed_token == model.fixed_token  # eager by default
    compiled, _ = replica_engine(str(ckpt_dir), None, tier.model_copy(update={"compile_decode": True}))
    assert compiled.engine.model._fixed_token != compiled.engine.model.fixed_token
    assert all(b.decode_step is not None for b in compiled.engine.model.recur)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="num_gpus=1.* but torch sees no CUDA device"):
            replica_engine(str(ckpt_dir), None, tier.model_copy(update={"num_gpus": 1}))


def test_s3_checkpoint_is_downloaded_once_per_node(ckpt_dir: Path, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    from checkpoints import Storage

    storage = Storage(s3_bucket.config())
    storage.upload_dir(ckpt_dir, storage.join("run", "final"))
    uri = f"{s3_bucket.uri}/run/final?endpoint_override={s3_bucket.endpoint_url.removeprefix('http://')}&scheme=http"
    cache = tmp_path / "cache"
    tokenizer, config = load_tokenizer_and_config(uri, cache)  # the ingress: no weights on its node
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "manifest.json", "tokenizer"]
    assert config.sequence_len == 64 and tokenizer.vocab_size == config.vocab_size
    first = load_engine(uri, cache)  # a replica on the same node adds the weights to the same entry
    assert first.path == entry and first.config.sequence_len == 64
    inode = os.stat(entry / "model.safetensors").st_ino
    assert load_engine(uri, cache).path == entry and os.stat(entry / "model.safetensors").st_ino == inode  # hit
    with pytest.raises(CheckpointError, match="manifest"):
        fetch_checkpoint(
            f"{s3_bucket.uri}/nothing-here?endpoint_override="
            f"{s3_bucket.endpoint_url.removeprefix('http://')}&scheme=http",
            cache_dir=cache,
        )


# ------------------------------------------------------------------------------------------------ CLI and chat
def test_serve_config_file_is_valid_for_serve_deploy(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app
    from serve.cli import main

    out = tmp_path / "serve_config.yaml"
    assert main(["serve", "build", "--checkpoint", "s3://b/ckpt", "-o", str(out), "--port", "8123"]) == 0
    config = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "serve.app:build_app" and config["http_options"]["port"] == 8123
    assert ServeConfig.model_validate(app["args"]).checkpoint == "s3://b/ckpt"
    build_app(app["args"])  # the builder accepts exactly what the file carries
    assert main(["serve", "build", "--config", str(tmp_path / "missing.yaml"), "-o", "-"]) == 2


def test_cli_reports_config_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serve.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoint: /x\ntiers: [{name: a, r_max: 0}]\n")
    assert main(["serve", "build", "--config", str(bad), "-o", str(tmp_path / "o.yaml")]) == 2
    assert "tiers[0].r_max" in capsys.readouterr().err


def test_terminal_chat_streams_with_engine(ckpt_dir: Path) -> None:
    from serve.chat import ChatSettings, run_chat

    inputs = iter(["hello there", "/r 3", "/exit 0.5", "/exit kl:1e-3:2", "/r 0", "and again", "/reset", "/quit"])
    out = io.StringIO()
    settings = ChatSettings(decode=DecodeSettings(num_recur=2), max_tokens=5)
    code = run_chat(load_engine(str(ckpt_dir)), settings, input_fn=lambda _: next(inputs), out=out)
    text = out.getvalue()
    assert code == 0 and text.count("bot> ") == 2 and "(conversation cleared)" in text
    assert "mean r 2.00" in text  # first answer at r = 2, no adaptive exit
    # /exit X keeps the criterion (the first registered one when none was set); a bad /r names the field
    assert "(decode r3)" in text and "(decode r3 latent:0.5)" in text and "(decode r3 kl:0.001:2)" in text
    assert "DecodeSettings.num_recur=0 is invalid" in text
    assert settings.decode == DecodeSettings(num_recur=3, exit=ExitRule(criterion="kl", threshold=1e-3, min_recur=2))


def test_chat_flags_change_only_what_they_name() -> None:
    import argparse

    from serve.cli import add_serve_subcommands, chat_decode

    parser = argparse.ArgumentParser()
    add_serve_subcommands(parser.add_subparsers(dest="command"))
    base = DecodeSettings(num_recur=4, kv_cache="ring:2", exit=ExitRule.parse("latent:1e-3"), warm_start=True)

    def decode(*flags: str) -> DecodeSettings:
        return chat_decode(base, parser.parse_args(["chat", "--checkpoint", "/c", *flags]))

    assert decode() == base
    assert decode("--recur", "8", "--exit", "kl:5e-4") == base.replace(num_recur=8, exit=ExitRule.parse("kl:5e-4"))
    assert decode("--exit", "off", "--no-warm-start", "--kv-cache", "final") == base.replace(
        exit=None, warm_start=False, kv_cache="final"
    )
    with pytest.raises(ValueError, match="kv_cache='ring:x'"):
        decode("--kv-cache", "ring:x")
    with pytest.raises(SystemExit):
        decode("--exit", "entropy:1")  # not a registered criterion: argparse refuses it with the reason


def test_a_server_sent_event_is_one_line_for_splitlines_clients() -> None:
    """Generated text may hold characters JSON leaves raw but str.splitlines (httpx's iter_lines) breaks lines at
    (NEL, U+2028, U+2029): they are escaped, so the event stays one line and decodes to the same text."""
    text = "a\x85b\u2028c\u2029d\x1ce\x0bf\u00e9\n"
    event = sse({"token_text": [text]}).decode()
    lines = event.splitlines()
    assert lines[0].startswith("data: ") and lines[1:] == [""]  # the payload line, then the blank line ending it
    assert json.loads(lines[0][6:]) == {"token_text": [text]}
    assert "\u00e9" in event  # the rest stays unescaped
