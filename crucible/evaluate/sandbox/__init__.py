"""Run untrusted generated code (HumanEval completions, code rewards) in a sandbox that holds.

Isolated mode (the default; Linux with `unshare`): the program runs in new network, mount, PID,
IPC, UTS (and, unless started by root, user) namespaces. It has no network (only a loopback
interface that is down), every mount is read-only, /tmp is a private size-limited tmpfs (its
working directory), /dev holds only null/zero/full/random/urandom, /run is empty, it has no
capabilities and cannot gain any (no_new_privs), and rlimits bound CPU time, address space,
processes, file size and open files. At the deadline the whole process tree dies: the program is
process 1 of its PID namespace, and killing it kills every descendant, including ones that called
setsid(). Captured output is capped; more kills the program.

Where namespaces are unavailable, untrusted code is refused (`SandboxUnavailable`) unless the
caller allows unsafe execution (argument `allow_unsafe=True`, `crucible eval --allow-unsafe-code`
or CRUCIBLE_ALLOW_UNSAFE_CODE=1). Unsafe mode keeps the rlimits, the output cap and the kill of
the program's process group, and nothing else: the program can read and write your files and use
the network. docs/evaluation.md ("Code execution sandbox") says what each mode protects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from crucible.config import ConfigError
from crucible.evaluate.sandbox.process import Limits, isolation, run

UNSAFE_ENV = "CRUCIBLE_ALLOW_UNSAFE_CODE"

__all__ = ["Limits", "RunResult", "SandboxUnavailable", "humaneval_check", "humaneval_program",
           "isolation_available", "require_sandbox", "run_python"]  # fmt: skip


class SandboxUnavailable(ConfigError):
    """Namespaces are unavailable and unsafe execution was not allowed."""


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout", "output_limit"
    output: str  # the last 2,000 characters of stdout+stderr


def isolation_available() -> tuple[bool, str]:
    """(True, "") when the isolated sandbox works on this machine, else (False, the reason)."""
    prefix, _, why = isolation()
    return prefix is not None, why


def _unsafe_allowed(allow_unsafe: bool | None) -> bool:
    if allow_unsafe is not None:
        return allow_unsafe
    return os.environ.get(UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes")


def require_sandbox(allow_unsafe: bool | None = None) -> bool:
    """Whether code will run isolated (True) or unsafe (False); SandboxUnavailable when neither."""
    ok, why = isolation_available()
    if ok:
        return True
    if _unsafe_allowed(allow_unsafe):
        return False
    raise SandboxUnavailable(
        f"refusing to run untrusted code: the sandbox is unavailable here ({why}); pass "
        f"--allow-unsafe-code (or set {UNSAFE_ENV}=1) to run it without isolation"
    )


def run_python(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: int | None = None,
    *,
    allow_unsafe: bool | None = None,
    limits: Limits | None = None,
) -> RunResult:
    """Run `program`; passed when it exits 0 within the limits.

    `limits` overrides every limit at once; otherwise timeout_s, memory_mb and cpu_s (default
    timeout + 1 s) are applied to the default Limits.
    """
    if limits is None:
        cpu = cpu_s or max(1, int(timeout_s) + 1)
        limits = Limits(timeout_s=timeout_s, cpu_s=cpu, memory_mb=memory_mb)
    isolated = require_sandbox(allow_unsafe)
    out = run(program, limits, isolated)
    text = out.output.decode(errors="replace")[-2000:]
    if out.timed_out:
        return RunResult(False, "timeout", text)
    if out.output_capped:
        return RunResult(False, "output_limit", text)
    ok = out.returncode == 0
    return RunResult(ok, "passed" if ok else "failed", text)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def humaneval_check(
    doc, completion: str, timeout_s: float = 10.0, allow_unsafe: bool | None = None
) -> bool:
    """Whether a HumanEval completion passes the problem's tests."""
    m = doc.meta
    program = humaneval_program(doc.prompt, completion, m["test"], m["entry_point"])
    return run_python(program, timeout_s, allow_unsafe=allow_unsafe).passed
