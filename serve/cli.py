"""`rnc serve deploy|status|shutdown|build` and `rnc chat`: argument parsing over importable functions.

Addresses:
  (none)                  start a local Ray in this process, deploy, serve until Ctrl-C (like `serve run`)
  auto | host:6379 | ray://host:10001
                          connect to a running cluster, deploy, return; the app keeps running in the cluster
  http://host:8265        the cluster's dashboard: submit the Serve config (what `serve deploy` does); this is
                          declarative for the whole cluster: applications not in the config are removed
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from checkpoints import CheckpointError
from recursive_model.recurrence import EXIT_CRITERIA, DecodeSettings, ExitRule, exit_help

from .affinity import cpus_left, resolve_cpus, running_on
from .config import ServeConfig, direct_ingress_env, load_config

APP_BUILDER = "serve.app:build_app"


# ------------------------------------------------------------------------------------------ importable functions
def build_serve_config(cfg: ServeConfig, host: str = "0.0.0.0", port: int = 8000) -> dict[str, Any]:
    """A Serve config file (`serve deploy` / KubeRay RayService `serveConfigV2`) running `build_app` with `cfg`."""
    from ray.serve.schema import ServeDeploySchema

    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.route_prefix,
                "import_path": APP_BUILDER,
                "args": cfg.model_dump(mode="json", exclude_none=True),
            }
        ],
    }
    ServeDeploySchema.model_validate(config)  # fail here rather than in the cluster
    return config


def write_serve_config(cfg: ServeConfig, path: str | Path, host: str = "0.0.0.0", port: int = 8000) -> dict[str, Any]:
    """Write `build_serve_config(...)` as YAML to `path`; returns the config."""
    config = build_serve_config(cfg, host, port)
    header = (
        f"# Serve config for {cfg.model_name} ({len(cfg.tiers)} tiers) written by `rnc serve build`.\n"
        "# Deploy: serve deploy <this file>   (or paste under a KubeRay RayService's serveConfigV2)\n"
    )
    Path(path).write_text(header + yaml.safe_dump(config, sort_keys=False))
    return config


def _connect(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING", log_to_driver=address is None)


def deploy(
    cfg: ServeConfig,
    address: str | None = None,
    host: str = "0.0.0.0",
    port: int = 8000,
    block: bool | None = None,
    direct_ingress: bool = False,
) -> dict[str, Any]:
    """Deploy `cfg` (see the module docstring for `address`). Returns the application status. With no address,
    `block` defaults to True: the local Ray cluster lives as long as this process.

    `direct_ingress`: start the local Ray in Ray Serve's throughput-optimized mode (`serve.config.direct_ingress_env`):
    the ingress replica answers on `port` itself and Serve's proxy, which Ray still starts, moves to `port + 1`.
    When tiers reserve CPUs for their engines (`TierConfig.engine_cpus`), a local Ray this starts runs its processes
    (the proxy, the ingress, the controller and the replicas' other threads) on the CPUs left."""
    import ray

    others = None
    if address is None and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):  # Ray starts here
        reserved = [resolve_cpus(f"tier {t.name!r}: engine_cpus", t.engine_cpus) for t in cfg.tiers if t.engine_cpus]
        others = cpus_left("engine_cpus", frozenset().union(*reserved)) if reserved else None
    if direct_ingress and (address is not None or ray.is_initialized()):
        raise ValueError(
            "direct_ingress needs the local Ray this command starts (no address): Ray reads the mode when its "
            "processes start; on a running cluster set serve.config.direct_ingress_env(port) in their environment"
        )
    if address and address.startswith(("http://", "https://")):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        ServeSubmissionClient(address).deploy_applications(build_serve_config(cfg, host, port))
        return {"submitted": address, "app": cfg.app_name, "note": "use `rnc serve status` to follow the rollout"}

    from ray import serve

    from .app import build_app

    with running_on(others):
        if direct_ingress:
            # Ray keeps a stopping ingress up for 30 s so that a load balancer in front stops routing to it first; a
            # local deploy has none, and Ctrl-C should not wait for it.
            env = {**direct_ingress_env(port), "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
            ray.init(address="local", runtime_env={"env_vars": env}, logging_level="WARNING")
        else:
            _connect(address)
    proxy_port = port + 1 if direct_ingress else port
    serve.start(http_options={"host": host, "port": proxy_port})  # ignored (with a warning) if Serve already runs
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    if not direct_ingress:
        host, port = _proxy_address(host, port)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{cfg.route_prefix}"
    if direct_ingress:
        _check_direct_ingress(url, cfg)
    info = {"app": cfg.app_name, "url": url, **status(None, cfg.app_name).get(cfg.app_name, {})}
    if block if block is not None else address is None:
        print(json.dumps(info, indent=2), flush=True)
        print(f"serving at {info['url']} (chat page there, API under v1/); Ctrl-C stops", flush=True)
        signal.signal(signal.SIGTERM, _raise_interrupt)  # `docker stop` / systemd stop like Ctrl-C
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return info


def _check_direct_ingress(url: str, cfg: ServeConfig) -> None:
    """The ingress replica takes the next free port when `port` is busy: make sure `url` is this application."""
    import httpx

    try:
        health = httpx.get(url.rstrip("/") + "/health", timeout=30).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ValueError(f"nothing of ours answers at {url} ({exc}); is the port used by another program?") from exc
    if health.get("model") != cfg.model_name:
        raise ValueError(f"{url} answers for {health.get('model')!r}, not {cfg.model_name!r}: the port is taken")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """Where the running Serve proxies listen: an already running Serve keeps its own HTTP options."""
    try:
        from ray.serve.context import _get_global_client  # no public accessor for the live http_options

        opts = _get_global_client().get_serve_details().get("http_options", {})
        return opts.get("host", host), int(opts.get("port", port))
    except Exception:
        return host, port


def status(address: str | None = None, app_name: str | None = None) -> dict[str, Any]:
    """Application and per-deployment status with replica counts (all apps when `app_name` is None)."""
    if address and address.startswith(("http://", "https://")):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        details = ServeSubmissionClient(address).get_serve_details()
        apps = details.get("applications", {})
        return {name: _summarise_details(app) for name, app in apps.items() if app_name in (None, name)}
    from ray import serve

    _connect(address)
    out: dict[str, Any] = {}
    for name, app in serve.status().applications.items():
        if app_name not in (None, name):
            continue
        out[name] = {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "message": app.message,
            "deployments": {
                dname: {
                    "status": str(getattr(d.status, "value", d.status)),
                    "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
                    "message": d.message,
                }
                for dname, d in app.deployments.items()
            },
        }
    return out


def _summarise_details(app: dict[str, Any]) -> dict[str, Any]:
    deployments = {}
    for name, d in app.get("deployments", {}).items():
        replicas: dict[str, int] = {}
        for r in d.get("replicas", []):
            replicas[r.get("state", "?")] = replicas.get(r.get("state", "?"), 0) + 1
        deployments[name] = {"status": d.get("status"), "replicas": replicas, "message": d.get("message", "")}
    return {"status": app.get("status"), "message": app.get("message", ""), "deployments": deployments}


def shutdown(address: str | None = None, app_name: str = "rnc", everything: bool = False) -> None:
    """Delete the application (or stop Serve entirely with `everything`)."""
    if address and address.startswith(("http://", "https://")):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        ServeSubmissionClient(address).delete_applications()  # the REST API only deletes all of them
        return
    from ray import serve

    _connect(address or "auto")
    if everything:
        serve.shutdown()
    else:
        serve.delete(app_name)


# ------------------------------------------------------------------------------------------------ argparse
def _one_line_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad configs and missing checkpoints end in one line naming the problem, not a traceback."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, FileNotFoundError, CheckpointError) as exc:
            print(f"rnc: error: {exc}", file=sys.stderr)
            return 2

    return wrapper


def _config_from_args(args: argparse.Namespace) -> ServeConfig:
    cfg = load_config(args.config, checkpoint=args.checkpoint)
    if args.engine_cpus is not None:
        cfg = cfg.with_engine_cpus(args.engine_cpus)
    return cfg


@_one_line_errors
def _cmd_deploy(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    if args.write_config:
        write_serve_config(cfg, args.write_config, args.host, args.port)
        print(f"wrote {args.write_config}")
    block = False if args.no_block else None
    info = deploy(cfg, args.address, args.host, args.port, block=block, direct_ingress=args.direct_ingress)
    print(json.dumps(info, indent=2))
    return 0


@_one_line_errors
def _cmd_build(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    if args.output == "-":
        yaml.safe_dump(build_serve_config(cfg, args.host, args.port), sys.stdout, sort_keys=False)
    else:
        write_serve_config(cfg, args.output, args.host, args.port)
        print(f"wrote {args.output}: deploy with `serve deploy {args.output}`")
    return 0


@_one_line_errors
def _cmd_status(args: argparse.Namespace) -> int:
    info = status(args.address or "auto", args.app)
    print(json.dumps(info, indent=2))
    return 0 if info else 1


@_one_line_errors
def _cmd_shutdown(args: argparse.Namespace) -> int:
    shutdown(args.address, args.app, everything=args.all)
    print("serve stopped" if args.all else f"application {args.app!r} deleted")
    return 0


# `rnc chat` flags that change the checkpoint's DecodeSettings; absent flags keep its value (argparse.SUPPRESS).
_DECODE_FLAGS = ("num_recur", "kv_cache", "exit", "warm_start")


def _exit_flag(spec: str) -> ExitRule | None:
    try:
        return None if spec == "off" else ExitRule.parse(spec)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def chat_decode(checkpoint_default: DecodeSettings, args: argparse.Namespace) -> DecodeSettings:
    """The checkpoint's DecodeSettings with the given `rnc chat` flags applied (ValueError names a bad one)."""
    return checkpoint_default.replace(**{f: getattr(args, f) for f in _DECODE_FLAGS if hasattr(args, f)})


@_one_line_errors
def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSettings, run_chat
    from .loading import load_engine

    loaded = load_engine(args.checkpoint, args.cache_dir)
    decode = chat_decode(loaded.config.decode, args)
    settings = ChatSettings(decode=decode, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k)
    return run_chat(loaded, settings, shade=False if args.no_shade else None)


def add_serve_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve {deploy,status,shutdown,build}` and `chat`. Each parser sets `func(args) -> exit code`."""
    serve_p = subparsers.add_parser("serve", help="deploy and manage the Ray Serve application")
    sub = serve_p.add_subparsers(dest="serve_command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", help="checkpoint URI (s3://... or a local directory); overrides the config")
        p.add_argument("--config", help="serve YAML (ServeConfig: tiers, limits, auth); default: built-in tiers")
        p.add_argument("--host", default="0.0.0.0", help="HTTP bind address (Serve's proxies, or the ingress)")
        p.add_argument(
            "--port", type=int, default=8000, help="HTTP port of the Serve proxies (with --direct-ingress: the ingress)"
        )
        p.add_argument(
            "--engine-cpus",
            metavar="CPUS",
            help="every tier's engine_cpus: its engine thread runs on these CPUs (e.g. 1 or 2-7), and a local Ray's "
            "other processes on the rest",
        )

    p = sub.add_parser("deploy", help="deploy locally (blocks) or to a cluster (--address)")
    config_args(p)
    p.add_argument("--address", help="Ray address (auto, host:port, ray://...) or dashboard URL http://host:8265")
    p.add_argument("--write-config", metavar="PATH", help="also write the Serve config YAML to PATH")
    p.add_argument("--no-block", action="store_true", help="return after deploying even without --address")
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="local Ray only: Ray Serve's throughput-optimized mode, the ingress answers on --port itself (no proxy "
        "hop; Serve's proxy moves to --port + 1)",
    )
    p.set_defaults(func=_cmd_deploy)

    p = sub.add_parser("build", help="write the Serve config YAML for `serve deploy` / KubeRay RayService")
    config_args(p)
    p.add_argument("-o", "--output", default="serve_config.yaml", help="output path ('-' for stdout)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("status", help="application, deployment and replica status")
    p.add_argument("--address", help="Ray address or dashboard URL (default: auto)")
    p.add_argument("--app", default=None, help="application name (default: all)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("shutdown", help="delete the application")
    p.add_argument("--address", help="Ray address or dashboard URL (default: auto)")
    p.add_argument("--app", default="rnc", help="application name")
    p.add_argument("--all", action="store_true", help="stop Serve entirely (every application)")
    p.set_defaults(func=_cmd_shutdown)

    p = subparsers.add_parser("chat", help="terminal chat with a checkpoint (Engine directly, no server)")
    p.add_argument("--checkpoint", required=True, help="checkpoint URI (s3://... or a local directory)")
    keep = argparse.SUPPRESS  # an absent decode flag keeps the checkpoint's own value
    p.add_argument("--recur", dest="num_recur", type=int, default=keep, help="recurrences per token")
    p.add_argument("--kv-cache", default=keep, help="exact | final | ring:K")
    p.add_argument(
        "--exit",
        type=_exit_flag,
        default=keep,
        metavar="CRITERION:THRESHOLD[:MIN_R]|off",
        help=f"adaptive exit, e.g. {next(iter(EXIT_CRITERIA))}:1e-3 ({exit_help()})",
    )
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=keep, help="warm-start tokens")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--cache-dir", default=None, help="where S3 checkpoints are cached")
    p.add_argument("--no-shade", action="store_true", help="no colour shading of tokens by recurrences")
    p.set_defaults(func=_cmd_chat)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m serve.cli ...`) until the lead wires these into `rnc`."""
    parser = argparse.ArgumentParser(prog="rnc")
    add_serve_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
