"""The Ray Serve application: a FastAPI ingress in front of one model deployment per compute tier.

    HTTP -> Ingress (parse, auth, route by budget, stream SSE) -> tier-<name> replicas (ReplicaBatcher over one
                                                                                  ContinuousEngine)

Each tier is its own deployment with its own autoscaling and resources, so cheap requests never queue behind deep
ones and each tier scales with its own traffic. Within a replica, every request shares the steps of one continuous-
batching engine, whatever its r (inside the tier's range), exit rule or sampling settings. Both deployments are thin:
request logic is in `serve.service`, batching in `serve.batcher`, both testable without Ray.

`build_app(args)` is the application builder for `serve.run`, `rnc serve deploy` and Serve config files
(`import_path: serve.app:build_app`, `args:` = a ServeConfig).
"""

# No `from __future__ import annotations` here: FastAPI must resolve the route annotations (`request: Request`)
# after Serve has rewritten the ingress methods, and string annotations then turn into query parameters.
import asyncio
import dataclasses
import functools
import hmac
import logging
import os
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from .affinity import format_cpus, resolve_cpus
from .batcher import EngineSpec, ReplicaBatcher
from .completions import CompletionPlanner, CompletionStreamFormatter
from .config import ServeConfig, format_validation_error
from .generation import Completion, GenerationRequest, StreamChunk
from .protocol import error_body
from .router import RequestError
from .scoring import ScoreRequest, TokenScores
from .service import ChatPlanner, StreamFormatter, error_response

logger = logging.getLogger("ray.serve")

_UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)


@serve.deployment(health_check_period_s=10)
class TierModel:
    """One tier's replica: the checkpoint's weights, loaded once, behind one continuous-batching engine."""

    def __init__(self, config: dict[str, Any], tier: str):
        from .loading import tier_engine
        from .metrics import TierMetrics

        cfg = ServeConfig.model_validate(config)
        self.tier = cfg.tier(tier)
        cpus = self.tier.engine_cpus
        spec = EngineSpec(
            functools.partial(tier_engine, cfg.checkpoint, cfg.cache_dir, self.tier),
            torch_threads=self.tier.torch_threads,
            engine_cpus=None if cpus is None else resolve_cpus(f"tier {tier!r}: engine_cpus", cpus),
            retry_after_s=self.tier.retry_after_s,
            stream_chunks_per_s=self.tier.stream_chunks_per_s,
        )
        try:
            self.batcher = ReplicaBatcher.from_spec(spec, TierMetrics(tier), process=self.tier.engine_process)
        except Exception as exc:
            raise RuntimeError(f"tier {tier!r}: {exc}") from exc

    async def generate(self, request: GenerationRequest) -> Completion:
        return await self.batcher.generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[StreamChunk | Completion]]:
        """A chunk, the Completion, or both per message (see ReplicaBatcher.stream_batches)."""
        async for batch in self.batcher.stream_batches(request, self.tier.stream_interval_s):
            yield batch

    async def score(self, request: ScoreRequest) -> TokenScores:
        """Log-probabilities from one full forward (beside the engine's steps; see EngineLoop)."""
        return await self.batcher.score(request)

    def info(self) -> dict[str, Any]:
        """Replica identity and load (tests use the actor name to kill a replica)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "tier": self.tier.name,
            "actor_name": ctx.get_actor_name(),
            "pid": os.getpid(),
            "engine_cpus": format_cpus(self.batcher.engine_cpus()),
            **dataclasses.asdict(self.batcher.stats()),
        }

    def check_health(self) -> None:
        if not self.batcher.healthy():
            raise RuntimeError(f"tier {self.tier.name}: the engine loop stopped")

    def __del__(self) -> None:  # Serve's graceful shutdown: stop the engine (and its process) with the replica
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()


api = FastAPI(title="recursive-gpt", description="OpenAI-compatible (chat) completions routed by compute budget")


class _TierClient:
    """A tier's deployment handle seen as a `serve.completions.Replica`."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def generate(self, request: GenerationRequest) -> Completion:
        return await self.handle.generate.remote(request)

    async def score(self, request: ScoreRequest) -> TokenScores:
        return await self.handle.score.remote(request)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP edge: validation, bearer auth, budget routing, streaming. Holds a handle per tier."""

    def __init__(self, config: dict[str, Any], tiers: dict[str, DeploymentHandle]):
        from .loading import load_tokenizer_and_config
        from .metrics import IngressMetrics

        self.config = ServeConfig.model_validate(config)
        tokenizer, model_config = load_tokenizer_and_config(self.config.checkpoint, self.config.cache_dir)
        self.planner = ChatPlanner(self.config, tokenizer, model_config.sequence_len)
        self.completion_planner = CompletionPlanner(self.config, tokenizer, model_config.sequence_len)
        by_reference = self.config.ingress.tier_transport == "object_store"
        self.handles = {name: h.options(_by_reference=by_reference) for name, h in tiers.items()}
        self.stream_handles = {name: h.options(stream=True) for name, h in self.handles.items()}
        self.token = self.config.resolve_auth_token()
        self.metrics = IngressMetrics()
        self.page = resources.files("serve").joinpath("static/index.html").read_text(encoding="utf-8")

    # ------------------------------------------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse)
    async def chat_page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.config.model_name, "tiers": list(self.handles)}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        return JSONResponse(self.planner.models())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        if (denied := self._check_auth(request)) is not None:
            self.metrics.response(None, denied.status_code)
            return denied
        try:
            plan = self.planner.plan(await request.body())
        except RequestError as exc:
            self.metrics.response(None, exc.status)
            return self._request_error(exc)
        tier = plan.route.tier
        if plan.request.stream:
            return await self._stream(tier, plan.generation, StreamFormatter(plan, self.config.model_name))
        try:
            done = await self.handles[tier].generate.remote(plan.generation)
        except Exception as exc:
            return self._upstream_error(exc, tier)
        self.metrics.response(tier, 200)
        return JSONResponse(self.planner.completion(plan, done))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        if (denied := self._check_auth(request)) is not None:
            self.metrics.response(None, denied.status_code)
            return denied
        planner = self.completion_planner
        try:
            plan = planner.plan(await request.body())
        except RequestError as exc:
            self.metrics.response(None, exc.status)
            return self._request_error(exc)
        tier = plan.route.tier
        if plan.request.stream:
            (prompt,) = plan.prompts  # the parser allows one prompt per stream
            formatter = CompletionStreamFormatter(planner, plan)
            if prompt.generation is None:  # echo only: the prompt is the whole answer
                self.metrics.response(tier, 200)
                end = formatter.event(Completion("length", len(prompt.ids), 0))
                return StreamingResponse(iter([formatter.start() + end]), media_type="text/event-stream")
            return await self._stream(tier, prompt.generation, formatter)
        client = _TierClient(self.handles[tier])
        try:
            results = await asyncio.gather(*(planner.run(plan, p, client) for p in plan.prompts))
        except Exception as exc:
            return self._upstream_error(exc, tier)
        self.metrics.response(tier, 200)
        return JSONResponse(planner.response(plan, list(results)))

    # --------------------------------------------------------------------------------------------- helpers
    async def _stream(self, tier: str, generation: GenerationRequest, formatter: Any) -> Response:
        gen = self.stream_handles[tier].stream.remote(generation)
        try:
            first = await gen.__anext__()  # errors before the first token still get a proper status code
        except Exception as exc:
            gen.cancel()
            return self._upstream_error(exc, tier)
        self.metrics.response(tier, 200)
        return StreamingResponse(
            self._sse(formatter, first, gen),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _sse(self, formatter: Any, first: Any, gen: Any) -> AsyncIterator[bytes]:
        try:
            yield formatter.start() + b"".join(map(formatter.event, first))  # one write per message from the tier
            async for batch in gen:
                yield b"".join(map(formatter.event, batch))
        except Exception as exc:  # the replica died mid-answer: tell the client instead of cutting the stream
            status, message = self._classify(exc, formatter.tier)
            logger.warning("stream on tier %s failed: %s", formatter.tier, message)
            yield StreamFormatter.error(message, status)
        finally:
            gen.cancel()  # a client that disconnected frees its engine row at the next step

    @staticmethod
    def _request_error(exc: RequestError) -> JSONResponse:
        body, status, headers = error_response(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    def _check_auth(self, request: Request) -> JSONResponse | None:
        if self.token is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return None
        return JSONResponse(
            error_body(
                "missing or invalid bearer token",
                "Authorization",
                code="invalid_api_key",
                err_type="authentication_error",
            ),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _classify(self, exc: BaseException, tier: str) -> tuple[int, str]:
        if isinstance(exc, _UNAVAILABLE):
            return 503, f"tier {tier!r} is unavailable right now ({type(exc).__name__}); retry"
        return 500, f"tier {tier!r} failed: {type(exc).__name__}: {exc}"

    def _upstream_error(self, exc: BaseException, tier: str) -> JSONResponse:
        cause = exc.cause if isinstance(exc, RayTaskError) else exc
        if isinstance(cause, RequestError):  # incl. 503 + Retry-After from a replica whose queue is full
            self.metrics.response(tier, cause.status)
            return self._request_error(cause)
        status, message = self._classify(exc, tier)
        if status == 500:
            logger.exception("tier %s failed", tier, exc_info=exc)
        self.metrics.response(tier, status)
        code = "service_unavailable" if status == 503 else "internal_error"
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(error_body(message, None, code, "server_error"), status_code=status, headers=headers)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder: `args` is a ServeConfig (dict or model). One deployment per tier behind the ingress."""
    if isinstance(args, ServeConfig):
        cfg = args
    else:
        try:
            cfg = ServeConfig.model_validate(dict(args))
        except ValidationError as exc:
            raise ValueError(f"invalid serve config: {format_validation_error(exc)}") from None
    cfg_dict = cfg.model_dump(mode="json")
    env = cfg.replica_env()
    tiers = {t.name: TierModel.options(**t.serve_options(env)).bind(cfg_dict, t.name) for t in cfg.tiers}
    ingress_actor: dict[str, Any] = {"num_cpus": cfg.ingress.num_cpus, "runtime_env": {"env_vars": env}}
    return Ingress.options(
        name="ingress",
        num_replicas=cfg.ingress.num_replicas,
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        ray_actor_options=ingress_actor,
    ).bind(cfg_dict, tiers)
