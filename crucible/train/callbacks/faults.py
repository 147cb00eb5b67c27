"""Faults injected on purpose (`faults:` in the config), to prove the guards work.

- nan_loss: the step's loss is multiplied by NaN (as an overflow would make it);
- lr_spike: the step's update uses `factor` x the learning rate (the damage shows a step later);
- poison_batch: every sequence of the step is one token repeated (a corrupted shard);
- crash: an exception in the middle of the step, on one rank or all (a bug, a lost device).

Each fires once per invocation, at its step; a rolled-back or resumed run meets it again only if
it trains that step again, exactly as a real bad batch would be met again.
"""

from __future__ import annotations

import torch

from crucible.data.loader import Batch
from crucible.train.callbacks.base import Callback
from crucible.train.state import Run, StepResult


class FaultInjector(Callback):
    def __init__(self, run: Run) -> None:
        self.faults = {f.step: f for f in run.cfg.faults}
        self.fired: set[int] = set()
        self._hook = None

    def _due(self, step: int, kind: str) -> bool:
        f = self.faults.get(step)
        return f is not None and f.kind == kind and step not in self.fired

    def on_step_start(self, run: Run) -> None:
        step = run.step + 1
        if self._due(step, "lr_spike"):
            run.lr_scales["fault"] = self.faults[step].factor
        if self._due(step, "nan_loss"):

            def poison(module, args, kwargs, output):
                if output.loss is not None:
                    output.loss = output.loss * float("nan")
                return output

            self._hook = run.model.register_forward_hook(poison, with_kwargs=True)

    def on_batches(self, run: Run, step: int, batches: list[Batch]) -> list[Batch]:
        if self._due(step, "crash"):
            rank = self.faults[step].rank
            if rank is None or rank == run.info.rank:
                raise RuntimeError(f"injected crash at step {step} on rank {run.info.rank}")
        if not self._due(step, "poison_batch"):
            return batches
        out = []
        for b in batches:
            token = b.tokens.new_full(b.tokens.shape, int(b.tokens[0, 0]))
            doc = torch.zeros_like(b.doc_ids) if b.doc_ids is not None else None
            out.append(Batch(token, token.clone(), doc, b.source_ids))
        return out

    def on_step_end(self, run: Run, result: StepResult) -> None:
        step = result.step
        if step in self.faults and step not in self.fired:
            self.fired.add(step)
            run.log("fault", step, kind=self.faults[step].kind)
        run.lr_scales.pop("fault", None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
