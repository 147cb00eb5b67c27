"""Ways a training run ends early on purpose, each with its documented exit code.

User errors (a bad config, a missing file) are `crucible.config.ConfigError` and exit 2; an
unexpected exception prints its traceback and exits 1. These are neither: the run itself decided
to stop, and says why in one line.
"""

from __future__ import annotations

EXIT_PREEMPTED = (
    75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after a checkpoint; rerun with --resume
)
EXIT_DIVERGED = 3  # the guards gave up: non-finite or spiking steps beyond the policy's budget


class TrainingStopped(Exception):
    """The run stopped early by its own decision; `exit_code` says how."""

    exit_code = 1


class Preempted(TrainingStopped):
    exit_code = EXIT_PREEMPTED


class Diverged(TrainingStopped):
    exit_code = EXIT_DIVERGED
