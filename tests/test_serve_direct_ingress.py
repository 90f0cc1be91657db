"""`rnc serve deploy --direct-ingress --engine-cpus N`: a local Ray in Ray Serve's throughput-optimized mode, where the
ingress replica answers HTTP itself. Runs the command in a subprocess (its own Ray, started with the mode's
environment), then checks that a plain and a streamed chat completion come back, that the process listening on the
port is the ingress replica, not Serve's proxy, and (with two CPUs or more) that each tier's engine thread runs on CPU
N while the ingress and the proxy run elsewhere."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve_fixtures import AUTH_TOKEN, free_port, make_tiny_checkpoint, running, serve_test_config, wait_for

REPO = Path(__file__).resolve().parents[1]


def two_free_ports() -> int:
    """A port P with P + 1 free too (the ingress takes P, Serve's proxy P + 1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:`port` (Linux /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # local port, state LISTEN
            inodes.add(fields[9])
    sockets = {f"socket:[{i}]" for i in inodes}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) in sockets:
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


def cmdline(pid: int | None) -> str:
    return "" if pid is None else Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def engine_processes() -> dict[int, int]:
    """Each tier replica's engine process (TierConfig.engine_process), by the replica's pid (Linux /proc)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if "serve.engine_process" in cmdline(int(proc.name)):
                status = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines())
                found[int(status["PPid"])] = int(proc.name)
        except (OSError, ValueError):
            continue
    return found


def tier_replicas_by_pinning(cpus: set[int]) -> tuple[int, int, list[int]]:
    """(tier replica processes, those with an engine thread that may run on exactly `cpus`, their engine processes).
    The engine thread is the main thread of the replica's engine process. Linux /proc."""
    replicas = pinned = 0
    children = engine_processes()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = cmdline(int(proc.name))
            if "ServeReplica" in cmd and ":tier-" in cmd:
                replicas += 1
                pinned += os.sched_getaffinity(children[int(proc.name)]) == cpus
        except (OSError, KeyError):
            continue
    return replicas, pinned, sorted(children.values())


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening process from Linux /proc")
def test_direct_ingress_answers_and_streams_without_the_proxy(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    config = serve_test_config(str(ckpt), str(tmp_path / "cache"))
    for tier in config["tiers"]:  # one replica each is enough here
        tier["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    port = two_free_ports()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the tests' cluster
    cmd = [sys.executable, "-m", "serve.cli", "serve", "deploy", "--config", str(tmp_path / "serve.yaml")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--direct-ingress"]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    engine_cpu = cpus[-1] if len(cpus) >= 2 else None  # the engines get the last CPU, Ray the others
    if engine_cpu is not None:
        cmd += ["--engine-cpus", str(engine_cpu)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("serving at"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while not ready.wait(1.0):
            assert proc.poll() is None, "rnc serve deploy exited:\n" + "".join(lines[-40:])
            assert time.monotonic() < deadline, "not serving after 240 s:\n" + "".join(lines[-40:])
        assert f"http://127.0.0.1:{port}/" in "".join(lines)
        ingress, proxy = listener_pid(port), listener_pid(port + 1)
        assert "ServeReplica" in cmdline(ingress) and "ingress" in cmdline(ingress)
        assert "ProxyActor" in cmdline(proxy)  # Ray still starts its proxy; it moved out of the way
        engines: list[int] = []
        if engine_cpu is not None:  # each tier's engine thread on its CPU; Ray's processes off it
            replicas, pinned, engines = tier_replicas_by_pinning({engine_cpu})
            assert replicas == pinned == len(config["tiers"]) and len(engines) >= replicas
            for pid in (ingress, proxy):
                assert engine_cpu not in os.sched_getaffinity(pid)  # type: ignore[arg-type]

        base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {AUTH_TOKEN}"}
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "max_recur": 4}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        done = r.json()
        assert done["usage"]["completion_tokens"] >= 1
        streamed_body = {**body, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=streamed_body, headers=headers, timeout=60) as s:
            assert s.status_code == 200
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        streamed = sum(len(c.get("token_text") or []) for c in chunks)
        assert streamed == chunks[-1]["usage"]["completion_tokens"] >= 1  # every token arrived, once
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30).status_code == 401  # auth still on
    finally:
        proc.send_signal(signal.SIGTERM)  # like Ctrl-C: serve.shutdown, then exit
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, "".join(lines[-40:])
    wait_for(lambda: not any(map(running, engines)), 30, what="the engine processes to exit")


def test_direct_ingress_refuses_a_running_cluster() -> None:
    from serve.cli import deploy
    from serve.config import ServeConfig

    cfg = ServeConfig.model_validate({"checkpoint": "unused", "tiers": [{"name": "t", "r_max": 2}]})
    with pytest.raises(ValueError, match="direct_ingress needs the local Ray"):
        deploy(cfg, address="auto", direct_ingress=True)
