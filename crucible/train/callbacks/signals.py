"""SIGTERM / SIGINT (preemption, Ctrl-C): finish the step, save a checkpoint, exit 75.

The flag travels with the step's all-reduce, so every rank stops after the same step even when
only one was signalled. A second signal restores the default behaviour (Ctrl-C twice kills).
"""

from __future__ import annotations

import signal
import threading

from crucible.train.callbacks.base import Callback
from crucible.train.errors import EXIT_PREEMPTED, Preempted
from crucible.train.state import Run, StepResult

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalCallback(Callback):
    def __init__(self) -> None:
        self.previous: dict[int, object] = {}

    def on_train_start(self, run: Run) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread

        def handler(signum, frame):
            run.stop_signal = signum
            for s, old in self.previous.items():  # a second signal acts at once
                signal.signal(s, old)

        for s in SIGNALS:
            self.previous[s] = signal.signal(s, handler)

    def on_step_end(self, run: Run, result: StepResult) -> None:
        if result.stop_requested and run.stop is None:
            name = signal.Signals(run.stop_signal).name if run.stop_signal else "a signal"
            run.stop = Preempted(
                f"stopped by {name} after step {result.step}; checkpoint saved; continue with "
                f"--resume (exit code {EXIT_PREEMPTED})"
            )

    def close(self) -> None:
        for s, old in self.previous.items():
            signal.signal(s, old)
        self.previous.clear()
