"""Run untrusted generated code (HumanEval) in a separate, limited subprocess; never in the calling process.

Layers, from strongest to weakest:
  - a separate `python -I` process (isolated mode: no PYTHON* env, no user site, no script dir on sys.path) in a
    fresh temporary directory, with an empty environment, in its own session so the whole group can be killed;
  - resource limits set in preexec_fn: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), written file size
    (RLIMIT_FSIZE, which also bounds stdout/stderr since they go to files), no core dumps;
  - a wall-time limit enforced by the parent (SIGKILL to the process group);
  - a new network namespace (`unshare -rn`) when the kernel allows it, so there is no network at all;
  - a guard run before the user code that replaces socket constructors and process / file-deletion helpers with
    functions that raise. It is no security boundary on its own (re-importing _socket gets around it), only a backstop
    for machines where unshare is not permitted.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_GUARD = r"""
import sys


def _blocked(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")


def _forbidden(*args, **kwargs):
    raise PermissionError("this operation is disabled in the sandbox")


def _guard():
    import _socket
    import os
    import shutil
    import socket
    import subprocess

    for module in (socket, _socket):
        for name in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, _blocked)
    for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp",
                 "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "chmod", "chown", "lchown", "fchmod", "fchown", "setuid"):
        if hasattr(os, name):
            setattr(os, name, _forbidden)
    subprocess.Popen = _forbidden
    shutil.rmtree = _forbidden
    shutil.move = _forbidden


_guard()
del _guard
with open(sys.argv[1], encoding="utf-8") as _f:
    _code = compile(_f.read(), "program.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

STATUSES = ("passed", "failed", "timeout", "memory")


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run."""

    status: str  # one of STATUSES
    returncode: int | None  # None when the parent killed it on wall time; negative = killed by that signal
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        """True if the program exited with code 0 within its limits."""
        return self.status == "passed"


@functools.cache
def _unshare_command() -> tuple[str, ...]:
    """`unshare -rn --` if this kernel lets us make a user + network namespace, else nothing (probed once)."""
    path = shutil.which("unshare")
    if path is None:
        return ()
    try:
        probe = subprocess.run([path, "-rn", "true"], env={}, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (path, "-rn", "--") if probe.returncode == 0 else ()


def _set_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
    # Runs in the child between fork and exec: only plain syscalls here.
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))  # SIGXCPU, then SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _read_head(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def execute_program(
    source: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    cpu_seconds: int | None = None,
    max_output_bytes: int = 1 << 20,
    isolate_network: bool = True,
) -> ExecutionResult:
    """Run `source` as a Python program in a limited subprocess; status "passed" iff it exits 0 within the limits."""
    if timeout <= 0:
        raise ValueError(f"execute_program timeout={timeout} must be > 0 seconds")
    if memory_mb < 64:
        raise ValueError(f"execute_program memory_mb={memory_mb} must be >= 64 (the interpreter needs ~30 MB)")
    cpu_seconds = cpu_seconds if cpu_seconds is not None else math.ceil(timeout)
    limits = functools.partial(_set_limits, memory_mb << 20, cpu_seconds, max_output_bytes)
    with tempfile.TemporaryDirectory(prefix="rnc-exec-") as tmp:
        runner, program = os.path.join(tmp, "runner.py"), os.path.join(tmp, "program.py")
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        with open(runner, "w", encoding="utf-8") as f:
            f.write(_GUARD)
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        wrapper = _unshare_command() if isolate_network else ()
        cmd = [*wrapper, sys.executable, "-I", runner, program]
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=tmp,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=limits,  # setrlimit only: safe between fork and exec
            )
            try:
                returncode: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
            # Kill the whole group either way: the program may have left children behind.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        stdout, stderr = _read_head(out_path, max_output_bytes), _read_head(err_path, max_output_bytes)
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    elif "MemoryError" in stderr:
        status = "memory"
    else:
        status = "failed"
    return ExecutionResult(status=status, returncode=returncode, stdout=stdout, stderr=stderr)
