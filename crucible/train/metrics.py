"""Metrics: `metrics.jsonl` first (one JSON object per event), TensorBoard and W&B as mirrors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from crucible.plan.hardware import lookup_accelerator

console = Console(highlight=False, soft_wrap=True)  # log lines stay whole in files


class MetricsLogger:
    """Appends events to run_dir/metrics.jsonl; mirrors scalars to TensorBoard/W&B if enabled.

    The mirrors open with `open_mirrors(resume_step)`: TensorBoard purges its events after that
    step (so a resumed run's curves are superseded, not doubled), and W&B continues the run
    whose id is kept in `wandb_id`.
    """

    def __init__(
        self, run_dir: Path, tensorboard: bool = True, wandb_project: str | None = None, cfg=None
    ):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._want_tb, self._wandb_project, self._cfg = tensorboard, wandb_project, cfg

    def open_mirrors(self, resume_step: int = 0) -> None:
        if self._want_tb and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    str(self.run_dir / "tensorboard"), purge_step=resume_step + 1
                )
            except ImportError:
                self._tb = None  # TensorBoard is optional
        if self._wandb_project and self._wandb is None:
            import wandb  # optional; the user asked for it, so a missing package is an error

            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=self._wandb_project, name=self.run_dir.name, id=run_id, resume="allow",
                config=self._cfg, dir=str(self.run_dir),
            )  # fmt: skip

    def truncate_after(self, step: int, keep: tuple[str, ...] = ()) -> None:
        """On resume, drop events logged after the checkpoint so curves have no duplicates;
        events of the kinds in `keep` stay (a rollback keeps the incidents that caused it)."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if _step_of(line) <= step or any(f'"event": "{k}"' in line for k in keep)
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, event: str, step: int, **values: Any) -> None:
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, int | float)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{event}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{event}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _step_of(line: str) -> float:
    """The step of one metrics line; a torn line (a kill mid-write) sorts after everything."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def read_metrics(run_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # a line torn by a crash mid-write: the rest is intact
                break
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return [r for r in rows if event is None or r.get("event") == event]


def peak_flops(device_type: str, device_index: int = 0) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of this device from the hardware table, with its name."""
    if device_type != "cuda":
        return None, device_type
    import torch

    name = torch.cuda.get_device_name(device_index)
    acc = lookup_accelerator(name)
    return (acc.bf16_dense_tflops * 1e12, acc.name) if acc else (None, name)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
