"""A replica's engine loop in a process of its own.

    replica (event loop, Ray's threads)  --socket: Submit / Cancel / Score-->  child: EngineLoop, one engine
                                         <--outputs and the engine's load----

In a thread of the replica, the engine shares a GIL with the replica's event loop and Ray's threads, which take it for
every request and stream chunk; each time, the engine thread waits (measured: it sleeps 8 % of its time under plain
HTTP load and 14 % when streaming, pinned to a CPU of its own; docs/LOG.md). In a child process it shares nothing but
a socket. The messages are small pickles (prompts, token ids, text pieces), one per step that has news; the weights
are loaded by the child itself from the checkpoint, never sent.

The child runs in a session of its own, so where Linux schedules sessions as groups (autogroup) the serving stack's
many processes cannot crowd out its one engine thread: on 2 cores that took the step's wall time from 1.3-2.3 ms over
its CPU time to 0.5-1.4 (docs/LOG.md). `ProcessLink` is the replica's end (a `serve.batcher.Link`); `python -m
serve.engine_process FD` is the child's, run only by ProcessLink. The child exits when the replica closes the link or
goes away (the socket's end of file).
Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .affinity import pin_current_thread, thread_cpus
from .batcher import Cancel, EngineLimits, EngineLoop, EngineSnapshot, EngineSpec, Outputs, Score, Submit

logger = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 0.05  # a snapshot with no output rides alone at most this often (and when the engine idles)


@dataclass(frozen=True)
class _Ready:
    limits: EngineLimits
    engine_cpus: frozenset[int]  # the CPUs the engine thread runs on, after pinning


@dataclass(frozen=True)
class _Stopped:
    """The child's last message: why its engine loop (or its start) ended, as text (an exception may not pickle)."""

    reason: str


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ProcessLink:
    """Start the child, hand it the spec and wait until its engine is loaded (raising what failed there)."""

    def __init__(
        self,
        spec: EngineSpec,
        on_output: Callable[[Outputs, EngineSnapshot | None, bool], None],
        on_stop: Callable[[BaseException], None],
    ):
        self._on_output = on_output
        self._on_stop = on_stop
        self._lock = threading.Lock()  # one sender at a time (event loops, close)
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # import what we import
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serve.engine_process", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                # its own scheduling group under autogroup (module docstring); no terminal or process-group signal
                # reaches it either: it ends when the link does
                start_new_session=True,
            )
        self.conn = Connection(ours.detach())
        self._reader: threading.Thread | None = None
        try:
            self.conn.send(spec)
            ready = self._wait_ready(spec.start_timeout_s)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self.conn.close()
            raise
        self.limits = ready.limits
        self._cpus = ready.engine_cpus

    def _wait_ready(self, timeout_s: float) -> _Ready:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(1.0):
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"the engine process exited (code {code}) before its engine was loaded")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine process did not load its engine within {timeout_s:.0f} s")
        try:
            msg = self.conn.recv()
        except EOFError:
            code = self.proc.wait()
            raise RuntimeError(f"the engine process exited (code {code}) before its engine was loaded") from None
        if isinstance(msg, _Stopped):
            raise RuntimeError(f"the engine process could not load its engine: {msg.reason}")
        assert isinstance(msg, _Ready), msg
        return msg

    def start_reading(self) -> None:
        """Deliver the child's messages to the callbacks from now on (on a thread of this link)."""
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        reason = None
        try:
            while True:
                msg = self.conn.recv()
                if isinstance(msg, _Stopped):
                    reason = msg.reason
                    break
                self._on_output(*msg)
        except (EOFError, OSError):
            pass
        code = self.proc.wait()
        self._on_stop(RuntimeError(reason or f"the engine process exited (code {code})"))

    def put(self, item: Submit | Cancel | Score) -> None:
        with self._lock:
            try:
                self.conn.send(item)
            except OSError:  # the child is gone: the reader reports it, and the open jobs fail with 503
                pass

    def close(self) -> None:
        with self._lock:
            try:
                self.conn.send(None)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.conn.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def engine_cpus(self) -> frozenset[int]:
        return self._cpus


# ------------------------------------------------------------------------------------------------------- child
def _serve(conn: Connection) -> None:
    lock = threading.Lock()  # the engine thread and the scoring thread both send

    def send(msg: Any) -> None:
        with lock:
            conn.send(msg)

    spec: EngineSpec = conn.recv()
    try:
        import torch

        torch.set_num_threads(spec.torch_threads)
        engine = spec.factory()
    except Exception as exc:
        logger.exception("the engine could not be loaded")
        send(_Stopped(_describe(exc)))
        return

    shipped = 0.0

    def output(outputs: Outputs, snapshot: EngineSnapshot | None, idle: bool) -> None:
        nonlocal shipped
        now = time.perf_counter()
        if not outputs and (snapshot is None or (not idle and now - shipped < SNAPSHOT_INTERVAL_S)):
            return  # a snapshot alone waits for the next output, the interval or the idle engine
        if snapshot is not None:
            shipped = now
        send((outputs, snapshot, idle))

    loop = EngineLoop(engine, output, spec.retry_after_s, spec.stream_chunks_per_s)

    def read() -> None:
        try:
            while True:
                item = conn.recv()
                loop.put(item)
                if item is None:
                    return
        except (EOFError, OSError):  # the replica went away
            loop.put(None)

    threading.Thread(target=read, name="reader", daemon=True).start()  # before the pin: it keeps the process's CPUs
    if spec.engine_cpus is not None:
        pin_current_thread(spec.engine_cpus)
    send(_Ready(EngineLimits.of(engine), thread_cpus(threading.current_thread())))
    error = loop.run()
    try:
        send(_Stopped(_describe(error)))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # A Ctrl-C to the process group is the replica's to handle: this process ends when the replica's socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(asctime)s engine %(levelname)s %(message)s")
    conn = Connection(int(args[0]))
    try:
        _serve(conn)
    except (EOFError, OSError):
        return 1  # the replica went away before or while we answered it
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    # Run the module's copy imported by its name: what the child pickles must name serve.engine_process, not __main__.
    from serve.engine_process import main as _main

    code = _main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with the reader and scoring threads still blocked in C calls, torch's and the
    # runtime's exit-time destructors can abort (SIGABRT, seen once in the test suite). Everything is answered by now.
    os._exit(code)
