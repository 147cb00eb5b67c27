"""The callback interface (see the package docstring for the order of the hooks)."""

from __future__ import annotations

from crucible.train.state import Run, StepResult


class Callback:
    """Base class: every hook does nothing. Guards override `check_step`."""

    def on_train_start(self, run: Run) -> None:
        pass

    def on_step_start(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run, result: StepResult) -> None:
        pass

    def on_train_end(self, run: Run) -> None:
        pass
