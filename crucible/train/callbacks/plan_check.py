"""Plan check: after the first steps, the planner's memory and throughput for this run's layout
beside what the run measures, logged once as a `plan_check` event.

Measured memory is the device's peak allocation on CUDA and the process's peak resident set
(host RSS, which also counts the Python runtime and the data) on CPU; predicted is the planner's
peak per device for the layout (`crucible.plan.memory`, autocast precision: what the trainer
runs). Throughput is predicted where the device is in the hardware table (GPUs), and measured
over up to three steps after the first two (compilation and allocator warm-up); a shorter run
measures what it has.
"""

from __future__ import annotations

import resource
import sys

import torch

from crucible.plan.hardware import lookup_accelerator
from crucible.plan.memory import estimate_memory
from crucible.plan.search import Cluster, predict_step
from crucible.plan.trainer_layouts import layout_of
from crucible.train.callbacks.base import Callback
from crucible.train.state import Run, StepResult

WARMUP_STEPS = 2  # the first (compilation) and second (recompiles, allocator) steps
MEASURED_STEPS = 3
GiB = 2**30


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:,.1f} MiB"


def measured_peak_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA peak allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "host peak RSS"


class PlanCheckCallback(Callback):
    def on_train_start(self, run: Run) -> None:
        self.first = run.step
        self.seconds = 0.0
        self.steps = 0
        self.done = False

    def on_step_end(self, run: Run, result: StepResult) -> None:
        if self.done:
            return
        k = result.step - self.first
        short = run.end_step - self.first <= WARMUP_STEPS  # too few steps to skip the warm-up
        if k > WARMUP_STEPS or short:
            self.seconds += result.data_seconds + result.compute_seconds
            self.steps += 1
        if self.steps and (self.steps >= MEASURED_STEPS or result.step >= run.end_step):
            self.done = True
            self._report(run)

    def _report(self, run: Run) -> None:
        cfg, world = run.cfg, run.info.world_size
        layout = layout_of(cfg, world)
        predicted_mem = estimate_memory(cfg.model, layout, "autocast").peak
        measured_mem, kind = measured_peak_bytes(run.device)
        measured_tps = run.tokens_per_step * self.steps / self.seconds / world
        predicted_tps = None
        if run.device.type == "cuda":
            acc = lookup_accelerator(torch.cuda.get_device_name(run.device))
            if acc is not None:
                parts = predict_step(
                    cfg.model, layout, Cluster(acc, world), cfg.train.global_batch_size, None
                )
                step_s = sum(parts.values())
                predicted_tps = cfg.train.tokens_per_step / step_s / world
        run.log(
            "plan_check",
            run.step,
            layout=layout.describe(),
            predicted_peak_bytes=predicted_mem,
            measured_peak_bytes=measured_mem,
            measured_memory=kind,
            predicted_tokens_per_s_per_device=predicted_tps,
            measured_tokens_per_s_per_device=measured_tps,
            measured_steps=self.steps,
        )
        tps = f"{predicted_tps:,.0f}" if predicted_tps else "n/a (device not in the table)"
        run.say(
            f"  plan check ({layout.describe()}): memory predicted {_size(predicted_mem)}, "
            f"measured {_size(measured_mem)} ({kind}); tokens/s/device predicted {tps}, "
            f"measured {measured_tps:,.0f}"
        )
