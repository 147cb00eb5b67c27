"""Cross-cutting concerns of the training loop, one module each, as callbacks.

The loop (`crucible.train.trainer`) calls, in registration order:

    on_train_start(run)              once, after setup and resume
    on_step_start(run)               before each step; may move `run.step` back (rollback)
    on_batches(run, step, batches)   may replace the step's batches (fault injection)
    check_step(run, result)          before the update; return a reason to skip it (guards)
    before_update(run, result)       the update will be applied (monitor snapshots)
    on_step_end(run, result)         after the update (logging, validation, checkpoints)
    on_train_end(run)                once, when the loop ends for any reason

A callback implements only the hooks it needs. One with `state_dict()` / `load_state_dict()`
has its state saved in every checkpoint, so a resumed run continues it exactly.
"""

from crucible.train.callbacks.base import Callback

__all__ = ["Callback"]
