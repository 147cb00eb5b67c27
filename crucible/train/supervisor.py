"""`crucible train --supervise`: restart a crashed run from its last intact checkpoint.

The supervisor runs `crucible train ... --resume` in a child process. A crash (any exit other
than the ones below, including SIGKILL) is followed by a restart after a backoff that doubles
each time, up to `max_restarts`. It does not retry what a retry cannot fix: a user error (exit 2)
or a run whose guards gave up (exit 3). SIGTERM/SIGINT are passed to the child, which saves a
checkpoint and exits 75; the supervisor then exits 75 too. Each child learns its attempt number
(`CRUCIBLE_SUPERVISOR_ATTEMPT`) and logs it in its `resume` event.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from rich.console import Console

from crucible.config import RunConfig
from crucible.train.errors import EXIT_DIVERGED, EXIT_PREEMPTED
from crucible.train.setup import check_output_dir

MAX_BACKOFF = 300.0
console = Console(stderr=True, highlight=False, soft_wrap=True)  # the child owns stdout
NO_RETRY = {0: "finished", 2: "a user error", EXIT_DIVERGED: "diverged"}


def supervise(
    cfg: RunConfig, train_args: list[str], resume: bool, max_restarts: int, backoff: float
) -> int:
    if max_restarts < 0:
        raise ValueError(f"--max-restarts {max_restarts}: must be 0 or more")
    if backoff < 0:
        raise ValueError(f"--backoff {backoff}: must be 0 or more seconds")
    check_output_dir(cfg.run_dir, resume)  # a fresh run must not silently continue another
    signalled: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame):
        signalled.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        attempt = 0
        while True:
            env = {**os.environ, "CRUCIBLE_SUPERVISOR_ATTEMPT": str(attempt)}
            cmd = [sys.executable, "-m", "crucible", "train", *train_args]
            if resume or attempt:
                cmd.append("--resume")
            child = subprocess.Popen(cmd, env=env)
            code = child.wait()
            if code in NO_RETRY or signalled:
                if code not in (0,) and code != EXIT_PREEMPTED:
                    why = NO_RETRY.get(code, f"exit code {code}")
                    console.print(f"[red]supervisor:[/] not restarting ({why})")
                return code if code >= 0 else 128 - code
            attempt += 1
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if attempt > max_restarts:
                console.print(
                    f"[red]supervisor:[/] training failed ({how}) and the restart budget "
                    f"({max_restarts}) is spent; giving up. Fix the cause, then run again "
                    "with --resume."
                )
                return 1
            delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF)
            console.print(
                f"[yellow]supervisor:[/] training failed ({how}); restart {attempt}/"
                f"{max_restarts} from the last intact checkpoint in {delay:.0f}s"
            )
            time.sleep(delay)
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
