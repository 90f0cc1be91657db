"""Serve pieces without Ray: config validation, budget routing, request parsing, the batching engine adapter,
checkpoint loading (local and S3 cache), the Serve config writer and the terminal chat."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from recursive_model.checkpoint import CheckpointError, load_checkpoint
from recursive_model.engine import Engine
from serve.config import ServeConfig, TierConfig, load_config
from serve.engine_adapter import BatchingEngine, Completion, GenerationRequest, StreamChunk, TokenDecoder
from serve.loading import fetch_checkpoint, load_engine
from serve.protocol import parse_chat_request
from serve.router import Budget, BudgetRouter, RequestError
from serve.service import ChatPlanner, StreamFormatter
from tests.serve_fixtures import make_tiny_checkpoint

if TYPE_CHECKING:
    from tests.conftest import S3Bucket

TIERS = [
    {"name": "low", "r_min": 1, "r_max": 2, "kv_cache": "final"},
    {"name": "medium", "r_min": 3, "r_max": 4},
    {"name": "high", "r_min": 5, "r_max": 8, "default_recur": 6, "exit_criterion": "kl"},
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


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[1] / "serve" / "serve.example.yaml", checkpoint="s3://b/c")
    assert [t.name for t in cfg.tiers] == ["low", "medium", "high"] and cfg.tier("high").exit_threshold == 5e-4
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
        ([], {}, "tiers"),
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
    assert (route.tier, route.num_recur, route.kv_cache) == ("high", 7, "exact")
    assert router.route(Budget(tier="high")).num_recur == 6  # default_recur
    assert router.route(Budget(tier="medium", max_recur=3)).num_recur == 3
    assert router.route(Budget()).exit_criterion == "none"  # never the checkpoint's own default


def test_router_overlapping_ranges_prefer_cheap_and_adaptive_exit() -> None:
    router = BudgetRouter([TierConfig(name="deep", r_min=1, r_max=16), TierConfig(name="cheap", r_min=1, r_max=4)])
    assert router.route(Budget(max_recur=3)).tier == "cheap"
    assert router.route(Budget(max_recur=9)).tier == "deep"
    route = router.route(Budget(max_recur=9, exit_threshold=1e-3))
    assert (route.exit_criterion, route.exit_threshold, route.min_recur) == ("latent", 1e-3, 1)
    assert router.route(Budget(max_recur=9, exit_threshold=1e-3, exit_criterion="kl")).exit_criterion == "kl"


@pytest.mark.parametrize(
    ("budget", "param"),
    [
        (Budget(tier="nope"), "tier"),
        (Budget(max_recur=9), "max_recur"),
        (Budget(max_recur=0), "max_recur"),
        (Budget(tier="low", max_recur=4), "max_recur"),
    ],
)
def test_router_errors_name_the_field(budget: Budget, param: str) -> None:
    router = BudgetRouter([TierConfig(**t) for t in TIERS])
    with pytest.raises(RequestError) as info:
        router.route(budget)
    assert info.value.param == param and info.value.status == 400
    assert "low [1, 2]" in info.value.message or param == "max_recur"


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
    assert (plan.route.tier, plan.generation.num_recur, plan.generation.max_tokens) == ("high", 7, 8)
    assert list(plan.generation.prompt) == engine.tokenizer.render_for_completion(
        {"messages": [*msg, {"role": "assistant", "content": ""}]}
    )
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


# --------------------------------------------------------------------------------------------- engine adapter
def test_token_decoder_holds_back_split_characters(engine: Engine) -> None:
    tok = engine.tokenizer
    ids = tok.encode("é 日本 👍")
    byte_ids = [b for ch in "日" for b in ch.encode()]  # single-byte tokens 0..255 are their bytes
    dec = TokenDecoder(tok)
    pieces = [dec.piece(i) for i in byte_ids] + [dec.flush()]
    assert pieces[:2] == ["", ""] and "".join(pieces) == "日"
    dec = TokenDecoder(tok)
    assert "".join([dec.piece(i) for i in ids] + [dec.flush()]) == "é 日本 👍"


def _req(engine: Engine, text: str, max_tokens: int = 8, r: int = 2, **kw: object) -> GenerationRequest:
    ids = engine.tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    )
    return GenerationRequest(tuple(ids), max_tokens, r, **kw)  # type: ignore[arg-type]


def test_batching_matches_the_engine_alone(engine: Engine) -> None:
    """Greedy decoding through the batcher (concurrent requests of different lengths, one batch) gives each request
    exactly what the Engine gives it alone."""
    texts = ["hi", "what is a list comprehension", "tell me more about python dictionaries please", "x"]
    reqs = [_req(engine, t, max_tokens=6 + i, temperature=0.0) for i, t in enumerate(texts)]

    async def run() -> tuple[list[Completion], int]:
        batcher = BatchingEngine(engine, max_batch_size=8, batch_wait_timeout_s=0.05)
        out = await asyncio.gather(*(batcher.generate(r) for r in reqs))
        return out, batcher.batches_run

    done, batches = asyncio.run(run())
    assert batches == 1
    for req, got in zip(reqs, done, strict=True):
        alone = engine.generate_batch([list(req.prompt)], max_tokens=req.max_tokens, temperature=0.0, num_recur=2)[0]
        assert got.text == alone.text and got.recurs == alone.recurs
        assert got.finish_reason == alone.finish_reason and got.batch_size == 4
        assert got.completion_tokens == len(alone.tokens) <= req.max_tokens


def test_stream_chunks_add_up_and_incompatible_requests_batch_apart(engine: Engine) -> None:
    async def run() -> tuple[list[list[StreamChunk | Completion]], int]:
        batcher = BatchingEngine(engine, max_batch_size=8, batch_wait_timeout_s=0.05)

        async def collect(req: GenerationRequest) -> list[StreamChunk | Completion]:
            return [ev async for ev in batcher.stream(req)]

        reqs = [_req(engine, "a", 10, r=1), _req(engine, "b", 10, r=3), _req(engine, "c", 10, r=1)]
        return await asyncio.gather(*(collect(r) for r in reqs)), batcher.batches_run

    streams, batches = asyncio.run(run())
    assert batches == 2  # r=1 twice in one batch, r=3 in another
    for events, r in zip(streams, (1, 3, 1), strict=True):
        *chunks, end = events
        assert isinstance(end, Completion) and all(isinstance(c, StreamChunk) for c in chunks)
        assert "".join(c.text for c in chunks) == end.text
        assert [x for c in chunks for x in c.recurs] == end.recurs == [r] * end.completion_tokens


def test_adaptive_exit_spends_fewer_recurrences(engine: Engine) -> None:
    req = _req(engine, "hello", 12, r=4, exit_criterion="latent", exit_threshold=1e9, min_recur=1, temperature=0.0)
    done = asyncio.run(BatchingEngine(engine).generate(req))
    assert done.recurs[0] == 4  # the first token comes from the prefill, which always runs the full r
    assert set(done.recurs[1:]) == {1} and done.mean_recur < 4


def test_batch_never_cuts_a_request_short(engine: Engine) -> None:
    """A long prompt would leave a short one fewer steps than it asked for: they must not share a batch."""
    seq = engine.config.sequence_len
    long_req = GenerationRequest(tuple([engine.bos] + [300] * (seq - 5)), 4, 2, temperature=0.0)
    short_req = _req(engine, "hi", 20, temperature=0.0)

    async def run() -> tuple[list[Completion], int]:
        batcher = BatchingEngine(engine, max_batch_size=8, batch_wait_timeout_s=0.05)
        return await asyncio.gather(batcher.generate(long_req), batcher.generate(short_req)), batcher.batches_run

    (long_done, short_done), batches = asyncio.run(run())
    assert batches == 2
    assert long_done.completion_tokens <= 4
    alone = engine.generate_batch([list(short_req.prompt)], max_tokens=20, temperature=0.0, num_recur=2)[0]
    assert short_done.text == alone.text


def test_cancelled_stream_stops_its_batch_and_errors_are_request_errors(engine: Engine) -> None:
    async def run() -> BatchingEngine:
        batcher = BatchingEngine(engine, batch_wait_timeout_s=0)
        gen = batcher.stream(_req(engine, "hi", 60))
        first = await gen.__anext__()
        assert isinstance(first, StreamChunk)
        await gen.aclose()  # the client went away
        done = await batcher.generate(_req(engine, "again", 3))  # the replica keeps serving
        assert done.completion_tokens <= 3
        with pytest.raises(RequestError) as info:
            await batcher.generate(GenerationRequest(tuple(range(1, 70)), 4, 2))
        assert info.value.param == "messages" and "context" in info.value.message
        assert batcher.queue_length == 0 and batcher.healthy()
        return batcher

    asyncio.run(run())


class _RecordingMetrics:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def queue_length(self, n: int) -> None:
        self.calls.append(("queue", n))

    def batch_finished(self, size: int, tokens: int, seconds: float) -> None:
        self.calls.append(("batch", size))

    def request_finished(self, completion: Completion) -> None:
        self.calls.append(("request", completion.completion_tokens))


def test_metrics_sink_sees_batches_and_requests(engine: Engine) -> None:
    metrics = _RecordingMetrics()

    async def run() -> None:
        batcher = BatchingEngine(engine, batch_wait_timeout_s=0.05, metrics=metrics)
        await asyncio.gather(*(batcher.generate(_req(engine, str(i), 4)) for i in range(3)))
        await asyncio.sleep(0.1)  # the batch is reported after its requests were answered

    asyncio.run(run())
    kinds = [k for k, _ in metrics.calls]
    assert kinds.count("request") == 3 and ("batch", 3) in metrics.calls and ("queue", 3) in metrics.calls


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
    with pytest.raises(CheckpointError, match="does not exist"):
        fetch_checkpoint(str(tmp_path / "missing"))


def test_s3_checkpoint_is_downloaded_once_per_node(ckpt_dir: Path, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    from pipelines.storage import Storage

    storage = Storage(s3_bucket.config())
    storage.upload_dir(ckpt_dir, storage.join("run", "final"))
    uri = f"{s3_bucket.uri}/run/final?endpoint_override={s3_bucket.endpoint_url.removeprefix('http://')}&scheme=http"
    first = fetch_checkpoint(uri, tmp_path / "cache")
    assert (first / "manifest.json").is_file()
    (first / "marker").write_text("cached")
    assert fetch_checkpoint(uri, tmp_path / "cache") == first and (first / "marker").is_file()  # cache hit
    assert load_engine(uri, tmp_path / "cache").config.sequence_len == 64
    with pytest.raises(CheckpointError, match="manifest"):
        fetch_checkpoint(
            f"{s3_bucket.uri}/nothing-here?endpoint_override="
            f"{s3_bucket.endpoint_url.removeprefix('http://')}&scheme=http",
            tmp_path / "cache",
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

    inputs = iter(["hello there", "/r 3", "/exit 0.5", "and again", "/reset", "/quit"])
    out = io.StringIO()
    code = run_chat(str(ckpt_dir), ChatSettings(max_tokens=5, num_recur=2), input_fn=lambda _: next(inputs), out=out)
    text = out.getvalue()
    assert code == 0 and text.count("bot> ") == 2 and "(r = 3)" in text and "(conversation cleared)" in text
    assert "mean r 2.00" in text  # first answer at r = 2, no adaptive exit
