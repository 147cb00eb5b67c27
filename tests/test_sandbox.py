"""The code sandbox holds: every escape measured on the old in-process patch now fails.

Each escape test is built so that it would succeed without the sandbox (a TCP server on the host's
loopback, a directory outside /tmp that the program can see, a marker process on the host's process
table), and the HumanEval canonical solutions still pass 164/164 inside it.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crucible.config import load_config
from crucible.evaluate import sandbox
from crucible.evaluate.benchmarks import build_benchmark, find_data, read_records
from crucible.evaluate.sandbox import (
    Limits,
    SandboxUnavailable,
    humaneval_check,
    isolation_available,
    run_python,
)
from crucible.evaluate.sandbox import process as sandbox_process
from crucible.evaluate.suite import build_task
from crucible.evaluate.task import GenDoc, run_task

ISOLATED, WHY = isolation_available()
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"no namespace sandbox here: {WHY}")


@pytest.fixture()
def listener():
    """A TCP server on the host's loopback that records whether anyone connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            hits.append(1)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def test_the_listener_is_reachable_without_a_sandbox(listener):
    port, hits = listener
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    time.sleep(0.3)
    assert hits  # so that the escape tests below would see a connection if one got through


NETWORK_ESCAPES = {
    "_socket": "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
    "reload": (
        "import importlib, socket\nsocket = importlib.reload(socket)\n"
        "socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    ),
    "child": (
        "import subprocess, sys\n"
        "code = \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"\n"
        "sys.exit(subprocess.run([sys.executable, '-c', code]).returncode)\n"
    ),
}


@needs_isolation
@pytest.mark.parametrize("how", sorted(NETWORK_ESCAPES))
def test_no_network(listener, how):
    port, hits = listener
    res = run_python(NETWORK_ESCAPES[how].format(port=port), timeout_s=5)
    time.sleep(0.3)
    assert not res.passed and res.status == "failed", res
    assert not hits


@pytest.fixture()
def outside_dir():
    """A directory outside /tmp that the sandboxed program can see (read-only)."""
    base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else str(Path.cwd())
    d = Path(tempfile.mkdtemp(prefix="crucible-sandbox-test-", dir=base))
    os.chmod(d, 0o777)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@needs_isolation
def test_no_writes_outside_the_private_tmp(outside_dir):
    target = outside_dir / "escaped"
    program = (
        "import os, sys\n"
        f"assert os.path.isdir({str(outside_dir)!r})\n"  # visible, so a failure is the sandbox's
        f"os.system('touch {target}.sh 2>/dev/null')\n"
        "try:\n"
        f"    open({str(target)!r}, 'w').write('x')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
        "open('/tmp/ok.txt', 'w').write('private tmp works')\n"
        "print(open('/tmp/ok.txt').read(), os.getcwd())\n"
    )
    res = run_python(program, timeout_s=5)
    assert res.passed, res.output
    assert "refused" in res.output and "private tmp works /tmp" in res.output
    assert not list(outside_dir.iterdir())


@needs_isolation
def test_no_capabilities_and_no_remount():
    program = (
        "import ctypes, os\n"
        "eff = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]\n"
        "assert int(eff, 16) == 0, eff\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.mount(None, b'/', None, 0x20 | 0x1000, None) != 0\n"  # MS_REMOUNT | MS_BIND
        "assert sorted(os.listdir('/dev')) == "
        "['fd', 'full', 'null', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']\n"
        "import multiprocessing as mp\n"
        "q = mp.Queue(); p = mp.Process(target=q.put, args=(42,)); p.start(); p.join()\n"
        "assert q.get() == 42\n"
    )
    res = run_python(program, timeout_s=5)
    assert res.passed, res.output


def _alive(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def _setsid_child(marker: str, then: str) -> str:
    child = "import os, sys, time; os.setsid(); time.sleep(60)"
    return (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}, {marker!r}])\n"
        "time.sleep(0.5)\n"
        f"{then}\n"
    )


@needs_isolation
@pytest.mark.parametrize("then", ["time.sleep(60)", "sys.exit(0)"])
def test_deadline_kills_a_child_that_left_the_session(then):
    marker = f"crucible-sandbox-marker-{uuid.uuid4().hex}"
    t0 = time.monotonic()
    res = run_python(_setsid_child(marker, then), timeout_s=3)
    took = time.monotonic() - t0
    assert took < 3 + 1, took  # the child holds stdout open, yet the limit holds
    assert res.status == ("timeout" if "sleep" in then else "passed"), res
    time.sleep(0.2)
    assert not _alive(marker)


@needs_isolation
def test_output_flood_is_capped():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    t0 = time.monotonic()
    res = run_python(flood, limits=Limits(timeout_s=2, cpu_s=3, output_bytes=1 << 20))
    assert res.status == "output_limit" and not res.passed
    assert time.monotonic() - t0 < 2
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 64 * 1024  # the peak RSS of this process grew by < 64 MiB


def test_the_unsafe_mode_caps_output_and_time_too():
    out = sandbox_process.run(
        "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n",
        Limits(timeout_s=2, output_bytes=1 << 16),
        isolated=False,
    )
    assert out.output_capped and len(out.output) == 1 << 16
    out = sandbox_process.run("while True: pass\n", Limits(timeout_s=1), isolated=False)
    assert out.timed_out and out.seconds < 2


def test_refused_without_isolation_unless_allowed(monkeypatch, tmp_path):
    sandbox_process.isolation.cache_clear()
    monkeypatch.setattr(sandbox_process.shutil, "which", lambda name: None)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    try:
        with pytest.raises(SandboxUnavailable, match="allow-unsafe-code"):
            run_python("print(1)")
        res = run_python("print(1)", allow_unsafe=True)
        assert res.passed and res.output == "1\n"
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
        assert run_python("print(2)").output == "2\n"
        # a HumanEval task stops before generating anything
        monkeypatch.delenv(sandbox.UNSAFE_ENV)
        doc = {"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
               "test": "def check(f):\n    assert f() == 1\n", "entry_point": "f"}  # fmt: skip
        task = build_benchmark("humaneval", [doc])
        with pytest.raises(SandboxUnavailable):
            run_task(task, lm=None)  # type: ignore[arg-type]
        # ... unless the task was built with allow_unsafe_code (eval --allow-unsafe-code, or
        # eval.allow_unsafe_code in a run config for in-loop evaluation)
        (tmp_path / "he.jsonl").write_text(json.dumps(doc) + "\n")
        task = build_task(f"humaneval={tmp_path / 'he.jsonl'}", allow_unsafe_code=True)
        task.preflight()
        assert task.check(task.docs[0], task.docs[0].answer)
        assert not task.check(task.docs[0], "    return 2\n")
        assert load_config("tiny", ["eval.allow_unsafe_code=true"]).eval.allow_unsafe_code
    finally:
        sandbox_process.isolation.cache_clear()


def test_greedy_humaneval_reports_pass_at_1(monkeypatch):
    records = [
        {"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
         "test": "def check(f):\n    assert f() == 1\n", "entry_point": "f"},
        {"task_id": "t/1", "prompt": "def g():\n", "canonical_solution": "    return 2\n",
         "test": "def check(g):\n    assert g() == 3\n", "entry_point": "g"},
    ]  # fmt: skip
    task = build_benchmark("humaneval", records)

    def fake_generate(lm, prompt, *a, **k):
        from crucible.evaluate.generation import Generation

        doc = next(d for d in task.docs if prompt.endswith(d.prompt))
        return Generation(doc.answer, True)

    monkeypatch.setattr("crucible.evaluate.task.generate_until", fake_generate)
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")  # isolated where available, else unsafe
    res = run_task(task, lm=None)  # type: ignore[arg-type]
    assert res["main_metric"] == "pass@1"
    assert res["metrics"]["pass@1"] == pytest.approx(0.5)  # the second test is wrong on purpose


def test_all_164_canonical_humaneval_solutions_pass(monkeypatch):
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")  # isolated where namespaces work, as here
    task = build_benchmark("humaneval", read_records(find_data("humaneval", None)))
    assert len(task.docs) == 164

    def check(doc: GenDoc) -> bool:
        return humaneval_check(doc, doc.answer)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, task.docs))
    failed = [d.meta["task_id"] for d, ok in zip(task.docs, results) if not ok]
    assert not failed


@needs_isolation
def test_file_size_and_private_tmp_size_are_limited():
    big = "open('/tmp/big', 'wb').write(b'x' * (20 << 20))\n"
    assert run_python(big, limits=Limits(timeout_s=5, file_mb=16)).status == "failed"
    fits = "open('/tmp/ok', 'wb').write(b'x' * (8 << 20))\n"
    assert run_python(fits, limits=Limits(timeout_s=5, file_mb=16)).passed
    full = "for i in range(3):\n    open(f'/tmp/f{i}', 'wb').write(b'x' * (12 << 20))\n"
    assert run_python(full, limits=Limits(timeout_s=5, file_mb=16, tmp_mb=32)).status == "failed"
