"""Run untrusted generated code in a separate, limited Python process.

Limits: wall-clock timeout (the process group is killed), CPU seconds and address space via
`resource` (POSIX), an empty temporary working directory, `python -I` (no user site, no env
vars), and no network: the socket module is replaced before the program runs. This keeps
honest mistakes (infinite loops, huge allocations, stray downloads) contained; it is not a
security boundary against deliberately hostile code - run untrusted models in a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PREAMBLE = """\
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
def _no_network(*a, **k):
    raise OSError("network access is disabled in the evaluation sandbox")
socket.socket = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
del resource, socket
"""


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    output: str


def run_python(
    program: str, timeout_s: float = 10.0, memory_mb: int = 1024, cpu_s: int | None = None
) -> RunResult:
    """Run `program`; passed when it exits 0 within the limits."""
    cpu = cpu_s or max(1, int(timeout_s) + 1)
    code = _PREAMBLE.format(mem=memory_mb * 2**20, cpu=cpu) + program
    with tempfile.TemporaryDirectory(prefix="crucible-sandbox-") as cwd:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "no_proxy": "*"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", code],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: children die with it
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return RunResult(False, "timeout", "")
    text = out.decode(errors="replace")[-2000:]
    return RunResult(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", text)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def humaneval_check(doc, completion: str, timeout_s: float = 10.0) -> bool:
    """Whether a HumanEval completion passes the problem's tests."""
    m = doc.meta
    program = humaneval_program(doc.prompt, completion, m["test"], m["entry_point"])
    return run_python(program, timeout_s).passed
