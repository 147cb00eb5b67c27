"""Executions per second of the code sandbox: the old in-process patch against the new namespaces.

    .venv/bin/python bench/sandbox_overhead.py [--problems 40] [--repeats 2] [--workers 1]

Runs the canonical HumanEval solutions (program = prompt + solution + tests, as `crucible eval`
builds it) one after another (or on --workers threads) through:
  * old: the previous sandbox (a child `python -I` whose socket module was patched before the
    program ran; no filesystem, network or process-tree isolation), reproduced here for reference;
  * unsafe: the new sandbox without namespaces (rlimits, output cap, process-group kill);
  * isolated: the new sandbox (user/net/mount/PID namespaces, read-only mounts, private /tmp).
Reports executions/s (best of --repeats) and the number that passed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

_OLD_PREAMBLE = """\
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


def old_run_python(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> bool:
    """The sandbox before issue 11 (crucible/evaluate/sandbox.py at aec13fc), for comparison."""
    code = _OLD_PREAMBLE.format(mem=memory_mb * 2**20, cpu=int(timeout_s) + 1) + program
    with tempfile.TemporaryDirectory(prefix="crucible-sandbox-") as cwd:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "no_proxy": "*"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", code], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False
    return proc.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    from crucible.evaluate.benchmarks import build_benchmark, find_data, read_records
    from crucible.evaluate.sandbox import humaneval_program, isolation_available
    from crucible.evaluate.sandbox.process import Limits, run

    task = build_benchmark("humaneval", read_records(find_data("humaneval", None)))
    docs = task.docs[: args.problems]
    programs = [
        humaneval_program(d.prompt, d.answer, d.meta["test"], d.meta["entry_point"]) for d in docs
    ]
    ok, why = isolation_available()
    modes = {
        "old (in-process socket patch)": old_run_python,
        "new, unsafe (rlimits only)": lambda p: run(p, Limits(), isolated=False).returncode == 0,
    }
    if ok:
        modes["new, isolated (namespaces)"] = lambda p: run(p, Limits(), True).returncode == 0
    else:
        print(f"isolated mode unavailable here: {why}")
    print(f"{len(programs)} HumanEval canonical solutions, {args.workers} worker(s), "
          f"best of {args.repeats}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")  # fmt: skip
    print("| sandbox | executions/s | passed | vs old |")
    print("|---|---|---|---|")
    base = None
    for name, fn in modes.items():
        best, passed = float("inf"), 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.workers) as pool:
                passed = sum(pool.map(fn, programs))
            best = min(best, time.perf_counter() - t0)
        rate = len(programs) / best
        base = base or rate
        print(f"| {name} | {rate:.1f} | {passed}/{len(programs)} | {rate / base:.2f}× |")


if __name__ == "__main__":
    main()
