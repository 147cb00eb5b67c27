"""Console progress and `train` events: loss, z-loss, LR, grad norm, throughput, MFU, ETA."""

from __future__ import annotations

import math

from crucible.data.mixture import MixtureLoader
from crucible.plan.flops import train_flops_per_token
from crucible.train.callbacks.base import Callback
from crucible.train.metrics import format_duration, peak_flops
from crucible.train.state import Run, StepResult


class LoggingCallback(Callback):
    """Every `train.log_every` steps: means over the steps since the last log line.

    Throughput counts only the steps' own time (data + compute), so validation, evaluation and
    checkpoints never make training look slower than it is.
    """

    def on_train_start(self, run: Run) -> None:
        cfg = run.cfg
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak, _ = peak_flops(run.device.type, run.device.index or 0)
        self.stage: str | None = None
        if run.resumed and isinstance(run.loader, MixtureLoader):  # logged before the restart
            self.stage = run.loader.stage_at_step(run.loader.step)
        self.step_time: float | None = None  # smoothed seconds per step, for the ETA
        self.next_step = run.step
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.z: list[float] = []
        self.extra: dict[str, list[float]] = {}
        self.seconds = self.data_seconds = 0.0
        self.steps = self.skipped = 0

    def on_step_start(self, run: Run) -> None:
        if run.step != self.next_step:  # a rollback: what was gathered belongs to the past
            self._reset()
            self.next_step = run.step
        if isinstance(run.loader, MixtureLoader):
            name = run.loader.stage_at_step(run.loader.step)
            if name != self.stage:
                self.stage = name
                run.log("stage", run.step, stage=name)
                run.say(f"  [bold]stage[/] {name} from step {run.step}")

    def on_step_end(self, run: Run, result: StepResult) -> None:
        self.steps += 1
        self.seconds += result.data_seconds + result.compute_seconds
        self.data_seconds += result.data_seconds
        self.next_step = result.step
        if result.finite and not result.skipped:  # skipped steps are incidents, not training
            self.losses.append(result.loss)
            self.z.append(result.z_loss)
            for k, v in result.extra.items():
                self.extra.setdefault(k, []).append(v)
        if result.skipped:
            self.skipped += 1
        done, cfg = result.step, run.cfg
        if not (done % cfg.train.log_every == 0 or done in (run.end_step, cfg.train.steps)):
            return
        dt = self.seconds / self.steps
        self.step_time = dt if self.step_time is None else 0.7 * self.step_time + 0.3 * dt
        tok_s = run.tokens_per_step / dt
        achieved = self.flops_per_token * tok_s / run.info.world_size
        mfu = achieved / self.peak if self.peak else None
        loss = sum(self.losses) / len(self.losses) if self.losses else math.nan
        z = sum(self.z) / len(self.z) if self.z else math.nan
        values = dict(
            loss=loss,
            z_loss=z,
            lr=result.lr,
            grad_norm=result.grad_norm,
            tokens=done * run.tokens_per_step,
            tokens_per_s=tok_s,
            data_wait=self.data_seconds / self.seconds if self.seconds else 0.0,
            data_seconds=self.data_seconds / self.steps,  # mean wait for batches per step
            flops_per_s_per_device=achieved,
        )
        if mfu is not None:
            values["mfu"] = mfu
        values.update({k: sum(v) / len(v) for k, v in self.extra.items()})
        if self.skipped:
            values["skipped_steps"] = self.skipped
        run.log("train", done, **values)
        speed = f"MFU {mfu:5.1%}" if mfu is not None else f"{achieved / 1e9:6.1f} GFLOP/s"
        eta = self.step_time * (run.end_step - done)
        skipped = f"  [yellow]{self.skipped} skipped[/]" if self.skipped else ""
        run.say(
            f"step {done:>6}/{cfg.train.steps}  loss {loss:7.4f}  lr {result.lr:.2e}  "
            f"gnorm {result.grad_norm:6.3f}  {tok_s:9,.0f} tok/s  {speed}  "
            f"ETA {format_duration(eta)}{skipped}"
        )
        self._reset()
