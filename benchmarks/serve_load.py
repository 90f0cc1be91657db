"""Serving load: HTTP throughput vs the Engine called directly, and low-budget latency next to deep requests.

1. Throughput, interleaved in `--rounds` windows (direct, HTTP, HTTP streaming, direct, ...):
   direct     `Engine.generate_batch` over `concurrency` prompts per call (every row starts and ends together, no
              serving stack, one torch thread like a replica)
   http       `concurrency` closed-loop clients, non-streaming, against the Serve app, all on the medium tier at the
              same r (one replica: one continuous-batching engine)
   http_stream  the same with `stream: true`
   Ratios are medians of per-round ratios. Besides tokens per wall second, tokens per CPU-second (client + proxy +
   ingress + replicas vs the bare Engine, from /proc) isolate the serving overhead from whatever else the machine
   runs. The replica's engine reports its mean rows per step, how busy it was, and its step's wall and CPU time.
   HTTP goes through Serve's proxy, or with `--direct-ingress` straight to the ingress replica (Ray Serve's
   throughput-optimized mode, what `rnc serve deploy --direct-ingress` runs).
2. Low budgets next to deep ones, interleaved in rounds (alone, mixed, alone, ...):
   one_replica  the `shared` tier (r 1-8, ONE replica, one engine): low-budget clients (max_recur 1) alone, then the
                same clients while as many high-budget clients (max_recur 8) share the engine. The ratio of their p50
                latencies is what a cheap request pays for sharing a replica with deep ones.
   by_tier      the same two groups on their own tiers (low r=1 and high r=8, a replica each): what routing by budget
                buys.

Weights are random (a checkpoint of `--preset` built on the fly): speed depends on the shape, not on what the model
learned. Prints one JSON object to stdout; never asserts on time.

    python benchmarks/serve_load.py [--quick] [--preset cpu-small] [--override n_embd=256 ...] [--concurrency 8]
                                    [--max-tokens 64] [--duration 24] [--rounds 3] [--direct-ingress]
                                    [--throughput-only]
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repo root importable

import httpx
import torch

from benchmarks._common import emit, environment, median, median_ratio, parser
from checkpoints import load_checkpoint, save_checkpoint
from recursive_model.config import GPTConfig
from recursive_model.corpus import shipped_corpus_paths
from recursive_model.engine import Engine
from recursive_model.model import GPT
from recursive_model.tokenizer import Tokenizer

PROMPTS = [
    "What is a Python list?",
    "Explain recursion briefly.",
    "hello",
    "How do I sort a dict by value?",
    "Write a haiku about CPUs.",
    "Why is the sky blue?",
    "Define entropy.",
    "What does yield do?",
]
TIERS = {"low": 1, "medium": 4, "high": 8}  # r per token of each single-r tier in this benchmark
SHARED = ("shared", 1, 8)  # one tier (and replica) serving every r in [1, 8]
GOAL_HTTP = 0.8  # HTTP (and streaming) tokens/s over the direct Engine's, at least
GOAL_LOW_P50 = 1.5  # low-budget p50 latency sharing a replica with deep requests over alone, at most


def build_checkpoint(directory: Path, preset: str, overrides: dict[str, Any]) -> Path:
    # A 512-token tokenizer trained in milliseconds on the shipped corpus: only the vocabulary size matters here.
    with gzip.open(shipped_corpus_paths()["train"], "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(120), strict=False)]
    tokenizer = Tokenizer.train(texts, 512)
    config = GPTConfig.from_preset(preset, **{"vocab_size": tokenizer.vocab_size, **overrides})
    torch.manual_seed(0)
    return save_checkpoint(directory, GPT(config), config, tokenizer, meta={"stage": "benchmark"})


def load_engine_direct(ckpt: Path) -> Engine:
    torch.set_num_threads(1)  # like a replica (torch_threads: 1)
    loaded = load_checkpoint(ckpt)
    loaded.model.eval()
    return Engine(loaded.model, loaded.tokenizer)


def prompt_ids(tokenizer: Any, i: int) -> list[int]:
    conv = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}, {"role": "assistant", "content": ""}]}
    return tokenizer.render_for_completion(conv)


def engine_direct(engine: Engine, concurrency: int, max_tokens: int, r: int, duration: float) -> tuple[float, float]:
    """(tokens per second, tokens per CPU-second) of generate_batch on `concurrency` prompts per call, repeated for
    `duration` seconds."""
    prompts = [prompt_ids(engine.tokenizer, i) for i in range(concurrency)]
    tokens, calls, t0, cpu0 = 0, 0, time.perf_counter(), sum(os.times()[:2])
    while time.perf_counter() - t0 < duration:
        results = engine.generate_batch(prompts, max_tokens=max_tokens, num_recur=r, seed=calls)
        tokens += sum(len(res.tokens) for res in results)
        calls += 1
    return tokens / (time.perf_counter() - t0), tokens / max(1e-9, sum(os.times()[:2]) - cpu0)


def serving_cpu_s() -> dict[str, float]:
    """CPU seconds used so far per part of the serving path: the load client (this process), the proxy, the
    ingress, the tier replicas and the controller. Linux /proc; only the client elsewhere."""
    parts = {"client": sum(os.times()[:2]), "proxy": 0.0, "ingress": 0.0, "tiers": 0.0, "controller": 0.0}
    hz = os.sysconf("SC_CLK_TCK")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes()
            part = next((name for key, name in _SERVE_PROCS if key in cmd), None)
            if part is None:
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            parts[part] += (int(fields[11]) + int(fields[12])) / hz  # utime + stime
        except OSError:
            continue
    return parts


def replica_window(base: str, replica: Any, body: dict, clients: dict[str, int], window: float) -> dict[str, float]:
    """One closed-loop window against one tier: tokens/s (wall and per serving CPU-second), p50, CPU-ms per request
    by part of the path, and what the replica's engine saw (rows decoded per step, fraction of the time busy)."""
    before, t0, cpu0 = replica.info.remote().result(), time.perf_counter(), serving_cpu_s()
    res = asyncio.run(closed_loop(base, {"medium": body}, clients, window))["medium"]
    wall, cpu1 = time.perf_counter() - t0, serving_cpu_s()
    after = replica.info.remote().result()
    parts = {k: cpu1[k] - cpu0[k] for k in cpu0}
    steps = max(1, after["steps"] - before["steps"])  # tokens per step = rows decoded together
    return {
        "http": res["tokens_per_s"],
        "http_cpu": res["tokens_per_s"] * wall / max(1e-9, sum(parts.values())),
        "p50": res["p50_ms"] or 0.0,
        "rows": (after["tokens_generated"] - before["tokens_generated"]) / steps,
        "busy": (after["busy_s"] - before["busy_s"]) / wall,
        "step_ms": 1000 * (after["busy_s"] - before["busy_s"]) / steps,
        "step_cpu_ms": 1000 * (after["busy_cpu_s"] - before["busy_cpu_s"]) / steps,
        **{f"cpu_ms_{k}": 1000 * v / max(1, res["requests"]) for k, v in parts.items()},
    }


_SERVE_PROCS = [
    (b"ray::ProxyActor", "proxy"),
    (b"ray::ServeReplica:bench:ingress", "ingress"),
    (b"ray::ServeReplica:bench:tier-", "tiers"),
    (b"serve.engine_process", "tiers"),  # a tier replica's engine process (TierConfig.engine_process)
    (b"ray::ServeController", "controller"),
]


async def closed_loop(
    base: str, bodies: dict[str, dict[str, Any]], clients: dict[str, int], duration: float
) -> dict[str, dict[str, Any]]:
    """Per group g: `clients[g]` clients sending `bodies[g]` back to back for `duration` s; latency and tokens."""
    stats: dict[str, dict[str, Any]] = {g: {"latencies": [], "tokens": 0, "errors": 0} for g in bodies}
    limits = httpx.Limits(max_connections=sum(clients.values()) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        deadline = time.perf_counter() + duration

        async def one_client(group: str, k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                body = {**bodies[group], "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                i += 1
                t0 = time.perf_counter()
                try:
                    if body.get("stream"):
                        n = 0
                        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                            async for line in r.aiter_lines():
                                if line.startswith("data: {"):
                                    n += len(json.loads(line[6:]).get("token_text") or [])
                        ok = r.status_code == 200
                    else:
                        r = await client.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200
                        n = r.json()["usage"]["completion_tokens"] if ok else 0
                except httpx.HTTPError:
                    ok, n = False, 0
                if ok:
                    stats[group]["latencies"].append(time.perf_counter() - t0)
                    stats[group]["tokens"] += n
                else:
                    stats[group]["errors"] += 1

        t_start = time.perf_counter()
        await asyncio.gather(*(one_client(g, k) for g, n in clients.items() for k in range(n)))
        elapsed = time.perf_counter() - t_start
    out = {}
    for g, s in stats.items():
        lat = sorted(s["latencies"])
        out[g] = {
            "requests": len(lat),
            "errors": s["errors"],
            "tokens_per_s": round(s["tokens"] / elapsed, 1),
            "p50_ms": round(1000 * median(lat), 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        }
    return out


def serve_config(ckpt: Path, concurrency: int, max_tokens: int, tier_extra: dict[str, Any]) -> dict[str, Any]:
    """One replica per tier, each as many engine rows as clients can send it; single-r tiers plus the shared one.
    `tier_extra`: more TierConfig settings of every tier (stream_*, engine_cpus)."""

    def tier(name: str, r_min: int, r_max: int) -> dict[str, Any]:
        return {
            "name": name,
            "r_min": r_min,
            "r_max": r_max,
            "num_cpus": 0.5,
            "torch_threads": 1,
            "max_running": concurrency,
            "max_waiting": concurrency,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            **tier_extra,
        }

    return {
        "checkpoint": str(ckpt),
        "app_name": "bench",
        "model_name": "bench",
        "max_tokens_limit": max_tokens,
        "default_max_tokens": max_tokens,
        "auth_token_env": None,
        "ingress": {"num_cpus": 0.25},
        "tiers": [*(tier(name, r, r) for name, r in TIERS.items()), tier(*SHARED)],
    }


def cpu_ms(rounds: dict[str, list[float]], prefix: str) -> dict[str, float]:
    """Median CPU-ms per request by part of the serving path, from the rounds' `<prefix><part>` series."""
    return {k.removeprefix(prefix): round(median(v), 2) for k, v in rounds.items() if k.startswith(prefix)}


def low_vs_high(base: str, bodies: dict[str, dict[str, Any]], half: int, window: float, rounds: int) -> dict[str, Any]:
    """Low-budget clients alone, then next to as many high-budget ones, interleaved in `rounds`; p50 ratio."""
    alone: list[dict[str, Any]] = []
    mixed: list[dict[str, dict[str, Any]]] = []
    for _ in range(rounds):
        alone.append(asyncio.run(closed_loop(base, {"low": bodies["low"]}, {"low": half}, window))["low"])
        mixed.append(asyncio.run(closed_loop(base, bodies, {"low": half, "high": half}, window)))
    ratios = [m["low"]["p50_ms"] / a["p50_ms"] for a, m in zip(alone, mixed, strict=True) if a["p50_ms"]]
    return {
        "low_alone": alone[len(alone) // 2],
        "mixed": mixed[len(mixed) // 2],
        "per_round_low_p50_ms": {
            "alone": [a["p50_ms"] for a in alone],
            "mixed": [m["low"]["p50_ms"] for m in mixed],
        },
        "low_p50_mixed_vs_alone": round(median(ratios), 3) if ratios else None,
    }


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small", help="model preset (random weights)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="GPTConfig override")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients = Engine batch size")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--duration", type=float, default=24.0, help="seconds per throughput variant (over all rounds)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved direct/HTTP (and alone/mixed) windows")
    p.add_argument("--stream-interval", type=float, default=None, help="tier stream_interval_s (default: TierConfig's)")
    p.add_argument("--stream-chunks-per-s", type=float, default=None,
                   help="tier stream_chunks_per_s (default: TierConfig's; 0 = no budget)")
    p.add_argument("--throughput-only", action="store_true", help="skip part 2 (low budgets next to deep ones)")
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--direct-ingress", action="store_true",
                   help="Ray Serve's throughput-optimized mode (serve.config.direct_ingress_env): the clients call the "
                   "ingress replica on --port, Serve's proxy moves to --port + 1 (what `rnc serve deploy "
                   "--direct-ingress` runs)")
    p.add_argument("--engine-cpus", default=None, metavar="CPUS",
                   help="every tier's engine_cpus (serve.affinity), e.g. 1, and the local Ray's processes on the other "
                   "CPUs, as `rnc serve deploy --engine-cpus` does; the load client runs there too, the direct engine "
                   "on these CPUs. The by-tier part of the low-budget test then runs two busy engines on them")
    p.add_argument("--engine-in-thread", action="store_true",
                   help="every tier's engine on a thread of its replica (TierConfig.engine_process false) instead of "
                   "a child process of its own")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of every replica (ServeConfig.env), e.g. a RAY_SERVE_* flag to measure")
    p.add_argument("--cluster-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of the local Ray cluster's processes (controller and proxy too), "
                   "not of this driver: what a cluster's container env sets")
    args = p.parse_args()
    if args.quick:
        args.preset, args.max_tokens, args.duration, args.rounds, args.concurrency = "tiny", 16, 2.0, 1, 4
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.override)}
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    import ray
    from ray import serve

    from serve.affinity import cpus_left, parse_cpus, pin_current_thread, running_on
    from serve.app import build_app
    from serve.config import ServeConfig, direct_ingress_env

    # Ray prints some worker messages straight to fd 1: keep stdout for the one JSON object.
    sys.stdout.flush()
    json_out = os.dup(1)
    os.dup2(2, 1)
    r = TIERS["medium"]
    window = args.duration / args.rounds
    tier_extra: dict[str, Any] = {} if args.stream_interval is None else {"stream_interval_s": args.stream_interval}
    if args.stream_chunks_per_s is not None:
        tier_extra["stream_chunks_per_s"] = args.stream_chunks_per_s or None
    if args.engine_cpus is not None:
        tier_extra["engine_cpus"] = args.engine_cpus
    if args.engine_in_thread:
        tier_extra["engine_process"] = False
    app_config = serve_config(Path("ckpt"), args.concurrency, args.max_tokens, tier_extra)
    app_config["env"] = dict(item.split("=", 1) for item in args.serve_env)
    with tempfile.TemporaryDirectory(prefix="rnc-bench-") as tmp:
        ckpt = build_checkpoint(Path(tmp) / "ckpt", args.preset, overrides)
        app_config["checkpoint"] = str(ckpt)
        engine = load_engine_direct(ckpt)
        engine.generate_batch([prompt_ids(engine.tokenizer, 0)], max_tokens=4, num_recur=r)  # warm-up
        cluster_env = dict(item.split("=", 1) for item in args.cluster_env)
        if args.direct_ingress:
            cluster_env.update(direct_ingress_env(args.port))
        # With --engine-cpus, everything but the engines runs on the other CPUs: Ray's processes, and this process
        # as the load client (a stand-in for clients on other machines); the direct engine runs on the engines' CPUs.
        engine_cpus = None if args.engine_cpus is None else parse_cpus(args.engine_cpus)
        others = None if engine_cpus is None else cpus_left("--engine-cpus", engine_cpus)
        if others is not None:
            pin_current_thread(others)  # before ray.init: Ray's processes inherit it
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            runtime_env={"env_vars": cluster_env},  # every Ray process of this cluster, not this driver
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port + args.direct_ingress})
            serve.run(
                build_app(app_config),
                name="bench",
                route_prefix="/",
            )
            base = f"http://127.0.0.1:{args.port}"
            body = {"model": "bench", "max_tokens": args.max_tokens, "tier": "medium"}
            clients = {"medium": args.concurrency}
            asyncio.run(closed_loop(base, {"medium": body}, clients, min(3.0, window)))  # warm-up
            medium = serve.get_deployment_handle("tier-medium", app_name="bench")
            medium_cpus = medium.info.remote().result()["engine_cpus"]  # what the replica really pinned
            rounds: dict[str, list[float]] = {"direct": [], "direct_cpu": []}
            for _ in range(args.rounds):  # direct, HTTP and HTTP streaming alternate: drift hits all alike
                with running_on(engine_cpus):  # the bare engine on the CPUs a served one gets
                    tps, tpc = engine_direct(engine, args.concurrency, args.max_tokens, r, window)
                rounds["direct"].append(tps)
                rounds["direct_cpu"].append(tpc)
                for key, b in (("http", body), ("stream", {**body, "stream": True})):
                    for k, v in replica_window(base, medium, b, clients, window).items():
                        rounds.setdefault(k if key == "http" else f"stream_{k}", []).append(v)
            shared_replica: dict[str, Any] = {"low_p50_mixed_vs_alone": None}
            separate_tiers: dict[str, Any] = {}
            if not args.throughput_only:
                half = max(1, args.concurrency // 2)
                shared = SHARED[0]
                one_replica = {
                    g: {"model": "bench", "max_tokens": args.max_tokens, "tier": shared, "max_recur": r}
                    for g, r in (("low", SHARED[1]), ("high", SHARED[2]))
                }
                by_tier = {t: {"model": "bench", "max_tokens": args.max_tokens, "tier": t} for t in ("low", "high")}
                asyncio.run(closed_loop(base, one_replica, {"low": half, "high": half}, min(3.0, window)))  # warm-up
                shared_replica = low_vs_high(base, one_replica, half, window, args.rounds)
                separate_tiers = low_vs_high(base, by_tier, half, window, args.rounds)
        finally:
            serve.shutdown()
            ray.shutdown()

    sys.stdout.flush()
    os.dup2(json_out, 1)
    ratio = median_ratio(rounds["http"], rounds["direct"])
    ratio_stream = median_ratio(rounds["stream_http"], rounds["direct"])
    low_p50 = shared_replica["low_p50_mixed_vs_alone"]
    goal_met = {
        "ratio_http_vs_direct": ratio >= GOAL_HTTP,
        "ratio_http_stream_vs_direct": ratio_stream >= GOAL_HTTP,
        "low_p50_mixed_vs_alone": None if args.throughput_only else low_p50 is not None and low_p50 <= GOAL_LOW_P50,
    }
    emit(
        {
            "benchmark": "serve_load",
            "quick": args.quick,
            "env": {**environment(), "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1)},
            "setup": {
                "preset": args.preset,
                "overrides": overrides,
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "window_s": window,
                "r_by_tier": TIERS,
                "shared_tier": {"name": SHARED[0], "r_min": SHARED[1], "r_max": SHARED[2]},
                "stream_interval_s": ServeConfig.model_validate(app_config).tier("medium").stream_interval_s,
                "stream_chunks_per_s": ServeConfig.model_validate(app_config).tier("medium").stream_chunks_per_s,
                "serve_env": app_config["env"],
                "cluster_env": args.cluster_env,
                "direct_ingress": args.direct_ingress,
                "engine_cpus": args.engine_cpus,
                "engine_process": ServeConfig.model_validate(app_config).tier("medium").engine_process,
            },
            "throughput": {
                "tier": "medium",
                "r": r,
                "medium_engine_cpus": medium_cpus,
                "engine_direct_tokens_per_s": round(median(rounds["direct"]), 1),
                "http_tokens_per_s": round(median(rounds["http"]), 1),
                "http_stream_tokens_per_s": round(median(rounds["stream_http"]), 1),
                "ratio_http_vs_direct": round(ratio, 3),
                "ratio_http_stream_vs_direct": round(ratio_stream, 3),
                "engine_direct_tokens_per_cpu_s": round(median(rounds["direct_cpu"]), 1),
                "http_tokens_per_cpu_s": round(median(rounds["http_cpu"]), 1),
                "ratio_http_vs_direct_per_cpu_s": round(median_ratio(rounds["http_cpu"], rounds["direct_cpu"]), 3),
                "http_cpu_ms_per_request": cpu_ms(rounds, "cpu_ms_"),
                "http_stream_cpu_ms_per_request": cpu_ms(rounds, "stream_cpu_ms_"),
                "http_stream_tokens_per_cpu_s": round(median(rounds["stream_http_cpu"]), 1),
                "http_p50_ms": round(median(rounds["p50"]), 1),
                "http_mean_rows_per_step": round(median(rounds["rows"]), 2),
                "http_replica_busy_fraction": round(median(rounds["busy"]), 3),
                "http_stream_p50_ms": round(median(rounds["stream_p50"]), 1),
                "http_stream_mean_rows_per_step": round(median(rounds["stream_rows"]), 2),
                "http_stream_replica_busy_fraction": round(median(rounds["stream_busy"]), 3),
                # The engine thread's wall and own CPU time per step: the gap is time it waited for a core or the GIL.
                **{
                    key: {"http": round(median(rounds[key]), 3), "stream": round(median(rounds[f"stream_{key}"]), 3)}
                    for key in ("step_ms", "step_cpu_ms")
                },
                "per_round": {k: [round(x, 1) for x in rounds[k]] for k in ("direct", "http", "stream_http")},
            },
            "low_budget_latency": {
                "low_p50_mixed_vs_alone": low_p50,
                "one_replica": shared_replica,
                "by_tier": separate_tiers,
            },
            "goal": f"ratio_http_vs_direct >= {GOAL_HTTP} and ratio_http_stream_vs_direct >= {GOAL_HTTP} "
            f"(concurrency {args.concurrency}); low_p50_mixed_vs_alone <= {GOAL_LOW_P50} (one replica)",
            "goal_met": goal_met,
        }
    )


if __name__ == "__main__":
    main()
