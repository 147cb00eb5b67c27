"""Chaos testing: SIGKILL this process at named points, to prove that no moment is unsafe.

Set `CRUCIBLE_CHAOS_FILE` to a file of whitespace-separated points, e.g. `step@3 save prune`.
When the process reaches a listed point (`save` inside a checkpoint write, `prune` inside
retention, `step@N` after step N), that entry is removed from the file and the process kills
itself, exactly as a preemption or an OOM kill would. Without the variable this does nothing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "CRUCIBLE_CHAOS_FILE"


def point(name: str, step: int | None = None) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    entries = Path(path).read_text().split()
    wanted = name if step is None else f"{name}@{step}"
    if wanted not in entries:
        return
    entries.remove(wanted)
    tmp = Path(path + ".tmp")
    tmp.write_text(" ".join(entries))
    tmp.replace(path)
    os.kill(os.getpid(), signal.SIGKILL)
