"""Fixtures and helpers of the serve tests: a tiny checkpoint (random weights + a tokenizer trained in milliseconds),
and one live Serve application per test module on the session's Ray cluster (`ray_cluster` in conftest.py).

Import the fixtures into a test module (`from tests.serve_fixtures import serve_app_fixture, ...`); they register
under their `name=` (`serve_app`, ...), so test arguments do not shadow the imports.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from checkpoints import save_checkpoint
from recursive_model.config import GPTConfig
from recursive_model.corpus import shipped_corpus_paths
from recursive_model.model import GPT
from recursive_model.tokenizer import Tokenizer

AUTH_TOKEN = "serve-test-token"
APP_NAME = "rnc-test"
_AWS_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def tiny_tokenizer(num_docs: int = 120) -> Tokenizer:
    with gzip.open(shipped_corpus_paths()["train"], "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(num_docs), strict=False)]
    return Tokenizer.train(texts, 512)


def make_tiny_checkpoint(
    directory: str | os.PathLike[str], sequence_len: int = 128, seed: int = 0, all_random: bool = False
) -> Path:
    """A complete checkpoint of the `tiny` preset with random weights (room for a few chat turns). `all_random`:
    every weight drawn, not only the initialized ones (the init zeroes output projections, so r barely matters)."""
    tokenizer = tiny_tokenizer()
    config = GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, sequence_len=sequence_len)
    torch.manual_seed(seed)
    model = GPT(config)
    if all_random:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.1)
    return save_checkpoint(directory, model, config, tokenizer, meta={"stage": "serve-test"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_test_config(checkpoint: str, cache_dir: str, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Three tiers with fractional CPUs and fast autoscaling: low (fixed 1), medium (1-2, scales), high (2). Waiting
    queues hold a burst of 200 requests, so no test but the one about full queues meets a 503."""
    fast = {"upscale_delay_s": 1.0, "downscale_delay_s": 3.0, "look_back_period_s": 1.0}
    env = {
        # Push autoscaling metrics every 0.5 s instead of 10 s, so the tests see scaling within seconds.
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RNC_SERVE_TOKEN": AUTH_TOKEN,
        **(extra_env or {}),
    }
    return {
        "checkpoint": checkpoint,
        "app_name": APP_NAME,
        "model_name": "tiny-test",
        "default_tier": "low",
        "default_max_tokens": 16,
        "max_tokens_limit": 64,
        "cache_dir": cache_dir,
        "env": env,
        "ingress": {"num_cpus": 0.1},
        "tiers": [
            {
                "name": "low",
                "r_min": 1,
                "r_max": 2,
                "kv_cache": "final",
                "num_cpus": 0.1,
                "max_waiting": 64,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, **fast},
            },
            {
                "name": "medium",
                "r_min": 3,
                "r_max": 4,
                "kv_cache": "ring:2",
                "num_cpus": 0.1,
                "max_running": 4,
                "max_waiting": 48,
                "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, **fast},
            },
            {
                "name": "high",
                "r_min": 5,
                "r_max": 8,
                "default_recur": 6,
                "kv_cache": "exact",
                "num_cpus": 0.1,
                "max_waiting": 64,
                "autoscaling": {"min_replicas": 2, "max_replicas": 2, **fast},
            },
        ],
    }


@dataclass
class LiveApp:
    """A running Serve application under test."""

    base_url: str  # http://127.0.0.1:PORT
    token: str
    config: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def model(self) -> str:
        return self.config["model_name"]


@pytest.fixture(scope="module", name="tiny_checkpoint_uri")
def tiny_checkpoint_uri_fixture(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """URI of a tiny checkpoint in a fresh bucket on the loopback S3 server (endpoint in the URI)."""
    import boto3

    from checkpoints import Storage, StorageConfig

    local = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))
    bucket = f"serve-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    storage = Storage(StorageConfig(uri=f"s3://{bucket}", endpoint_url=s3_server))
    storage.upload_dir(local, storage.join("ckpt"))
    host_port = s3_server.removeprefix("http://")
    return f"s3://{bucket}/ckpt?endpoint_override={host_port}&scheme=http"


@pytest.fixture(scope="module", name="serve_app")
def serve_app_fixture(
    ray_cluster: ModuleType, tiny_checkpoint_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveApp]:
    """The application deployed once per module from the S3 checkpoint, with bearer auth on."""
    # The replicas get the fake S3 credentials explicitly: Ray may have been started before the S3 fixture set them.
    aws_env = {k: os.environ[k] for k in _AWS_KEYS if k in os.environ}
    config = serve_test_config(tiny_checkpoint_uri, str(tmp_path_factory.mktemp("serve-cache")), aws_env)
    yield from deploy(config)


def deploy(config: dict[str, Any]) -> Iterator[LiveApp]:
    """Run the application of `config` on loopback until the generator is closed (the body of a fixture)."""
    from ray import serve

    from serve.app import build_app
    from serve.cli import _proxy_address

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    print(f"serve.run took {time.perf_counter() - t0:.1f}s")
    _, port = _proxy_address("127.0.0.1", port)  # a Serve started earlier keeps its own port
    yield LiveApp(f"http://127.0.0.1:{port}", AUTH_TOKEN, config)
    serve.shutdown()


def running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return 0
    states = app.deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.25, what: str = "condition") -> float:
    """Poll until `predicate()` is truthy; returns the seconds it took, fails the test on timeout."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if predicate():
            return time.perf_counter() - t0
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


class BackgroundLoad:
    """Closed-loop HTTP load on another thread: `concurrency` clients each send `body` until stopped. Each logical
    request is retried (up to `retries` times, 0.5 s apart) on 5xx, transport errors and SSE error events, which is
    what an OpenAI client does; `failed` counts requests that still failed after that."""

    def __init__(self, app: LiveApp, body: dict[str, Any], concurrency: int, retries: int = 6):
        import threading

        self.app, self.body, self.concurrency, self.retries = app, body, concurrency, retries
        self.ok = self.failed = self.retried = 0
        self.errors: list[str] = []
        self.finished_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency + 4)
        async with httpx.AsyncClient(
            base_url=self.app.base_url, headers=self.app.headers, timeout=60, limits=limits
        ) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))

    async def _client(self, client: Any) -> None:
        import httpx

        while not self._stop.is_set():
            for attempt in range(self.retries + 1):
                try:
                    r = await client.post("/v1/chat/completions", json=self.body)
                    error = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                    if error is None and self.body.get("stream") and '"error"' in r.text:
                        error = "SSE error event"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                if error is None:
                    self.ok += 1
                    self.finished_at.append(time.perf_counter())
                    break
                self.errors.append(error)
                if attempt == self.retries:
                    self.failed += 1
                else:
                    self.retried += 1
                    await asyncio.sleep(0.5)


def find_chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class HeadlessChromium:
    """A headless Chromium driven over the DevTools protocol (websocket), enough to script one page."""

    def __init__(self, binary: str, profile_dir: Path):
        import subprocess

        self.profile_dir = profile_dir
        # --no-sandbox: CI and this machine run tests as root, where Chromium refuses to start sandboxed.
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile_dir}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._ids = 0
        # aiohttp (a Ray Serve dependency) speaks the websocket; a private loop keeps this class synchronous.
        self._loop = asyncio.new_event_loop()
        self._session, self._ws = self._loop.run_until_complete(self._connect())

    async def _connect(self) -> tuple[Any, Any]:
        import aiohttp
        import httpx

        port_file = self.profile_dir / "DevToolsActivePort"
        wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), 30, what="chromium to start")
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0, timeout=10)
        return session, ws

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        return self._loop.run_until_complete(self._send(self._ids, method, params))

    async def _send(self, msg_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = await self._ws.receive_json(timeout=30)
            if msg.get("id") == msg_id:  # everything else is an event we did not subscribe to
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete", 20, what=f"{url} to load")

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._ws.close())
            self._loop.run_until_complete(self._session.close())
            self._loop.close()
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def running(pid: int) -> bool:
    """(Linux /proc) The process exists and has not exited (a zombie waiting for its parent to reap it has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tiny_engine64(checkpoint: str, tier: Any) -> Any:
    """A replica's ContinuousEngine for `tier` (a serve.config.TierConfig) in float64: the `EngineSpec.factory` of
    tests that compare exact tokens across engines, which float32 rounding may flip. Importable by name, so a child
    engine process can build it too."""
    from recursive_model.batching import ContinuousEngine
    from serve.loading import load_engine

    loaded = load_engine(checkpoint)
    model = loaded.engine.model.double()
    return ContinuousEngine(model, loaded.tokenizer, **tier.engine_options(loaded.config.sequence_len))
