"""Start a limited child process, read its output up to a cap, and kill its whole tree at a deadline.

Two modes share this code:
  * isolated: `unshare` puts the program into new user (when not root), network, mount, PID, IPC
    and UTS namespaces; `launch.py` then locks the filesystem and drops privileges (see there).
  * unsafe: a plain child process with the same rlimits, session and output cap, for machines
    without namespaces, and only when the caller explicitly allows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

LAUNCHER = Path(__file__).with_name("launch.py")
_NAMESPACES = ["--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
               "--mount-proc", "--propagation", "private"]  # fmt: skip


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, for the whole process tree
    cpu_s: int = 11  # CPU seconds of each process (RLIMIT_CPU)
    memory_mb: int = 1024  # address space of each process (RLIMIT_AS)
    nproc: int = 64  # processes (RLIMIT_NPROC; the kernel exempts uid 0, see docs)
    file_mb: int = 16  # largest file a process may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    tmp_mb: int = 64  # size of the private /tmp (isolated mode)
    output_bytes: int = 1 << 20  # captured stdout+stderr; more kills the program

    def launcher_params(self) -> dict[str, int]:
        return {"cpu_s": self.cpu_s, "memory_bytes": self.memory_mb << 20, "nproc": self.nproc,
                "file_bytes": self.file_mb << 20, "open_files": self.open_files,
                "tmp_mb": self.tmp_mb}  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None: killed by us (deadline or output cap)
    output: bytes  # at most Limits.output_bytes
    timed_out: bool
    output_capped: bool
    seconds: float


def _world_usable(path: Path) -> bool:
    """Whether uid nobody can reach `path`, as given and resolved (every directory above it o+x,
    the path itself o+r)."""
    for p in (path.absolute(), path.resolve()):
        if any(not os.stat(parent).st_mode & stat.S_IXOTH for parent in p.parents):
            return False
        if not os.stat(p).st_mode & stat.S_IROTH:
            return False
    return True


def _as_nobody() -> bool:
    """Real root drops to nobody when nobody can run this Python (interpreter, stdlib)."""
    needed = [Path(sys.executable), Path(os.__file__).parent]  # interpreter, standard library
    return os.geteuid() == 0 and all(_world_usable(p) for p in needed)


@cache
def isolation() -> tuple[list[str] | None, dict[str, str], str]:
    """(command prefix, environment, "") when namespaces work here, else (None, {}, why not)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, {}, "`unshare` (util-linux) is not installed"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if _as_nobody():
        prefix = [unshare, *_NAMESPACES]
        env["CRUCIBLE_SANDBOX_AS_NOBODY"] = "1"
    else:
        prefix = [unshare, "--user", "--map-root-user", *_NAMESPACES]
    cmd = [*prefix, sys.executable, "-I", "-S", str(LAUNCHER), "--probe",
           json.dumps(Limits().launcher_params())]  # fmt: skip
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, {}, f"probe failed: {e}"
    if r.returncode != 0 or r.stdout.strip() != b"ok":
        err = (r.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return None, {}, f"namespaces unavailable ({err})"
    return prefix, env, ""


def _limit_self(limits: Limits) -> None:  # preexec of the unsafe mode (runs in the child)
    for name, value in (
        ("RLIMIT_CPU", limits.cpu_s),
        ("RLIMIT_AS", limits.memory_mb << 20),
        ("RLIMIT_NPROC", limits.nproc),
        ("RLIMIT_FSIZE", limits.file_mb << 20),
        ("RLIMIT_NOFILE", limits.open_files),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the session's process group; in isolated mode this also ends the PID namespace
    (unshare --kill-child takes its init down, and the kernel then kills every process in it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def run(program: str, limits: Limits, isolated: bool) -> Outcome:
    """Run a Python `program` under `limits`: isolated (namespaces) or unsafe (rlimits only)."""
    t0 = time.monotonic()
    deadline = t0 + limits.timeout_s
    cwd = None
    if isolated:
        prefix, env, why = isolation()
        if prefix is None:
            raise RuntimeError(why)
        cmd = [*prefix, sys.executable, "-I", "-S", str(LAUNCHER),
               json.dumps(limits.launcher_params())]  # fmt: skip
        stdin_data, preexec = program.encode(), None
    else:
        cwd = tempfile.mkdtemp(prefix="crucible-unsafe-")
        path = Path(cwd) / "main.py"
        path.write_text(program)
        cmd = [sys.executable, "-I", str(path)]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "HOME": cwd,
               "TMPDIR": cwd}  # fmt: skip
        stdin_data, preexec = b"", (lambda: _limit_self(limits))
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if stdin_data else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        if stdin_data:
            assert proc.stdin is not None
            try:
                proc.stdin.write(stdin_data)
                proc.stdin.close()
            except BrokenPipeError:
                pass
        out, timed_out, capped = _read_capped(proc, deadline, limits.output_bytes)
        if timed_out or capped:
            _kill_tree(proc)
        try:
            rc: int | None = proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            proc.wait()
            rc, timed_out = None, True
        if timed_out or capped:
            rc = None
        _kill_tree(proc)  # anything the program left behind in its process group (unsafe mode)
        return Outcome(rc, out, timed_out, capped, time.monotonic() - t0)
    finally:
        if cwd is not None:
            shutil.rmtree(cwd, ignore_errors=True)


def _read_capped(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bool, bool]:
    """(output, timed_out, capped): read until EOF, the deadline, or `cap` bytes."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    size = 0
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.stdout.close()
                return b"".join(chunks), True, False
            if not sel.select(timeout=left):
                continue
            data = os.read(fd, 65536)
            if not data:
                proc.stdout.close()
                return b"".join(chunks), False, False
            chunks.append(data[: cap - size])
            size += len(data)
            if size > cap:
                proc.stdout.close()
                return b"".join(chunks), False, True
