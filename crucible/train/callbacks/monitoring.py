"""Monitoring beyond loss, and alerts that name a probable cause.

Cheap, at every log step (`monitor` events): host and device memory, and for MoE models the
expert load per layer with a balance measure (max/mean, coefficient of variation). The logging callback
already records tokens/s, the data-wait share of step time and the z-loss.

Detailed, every `monitor.every` steps (`monitor_detail` events), through hooks that exist only
during that step: per-layer grad norm (before clipping), parameter RMS and update/parameter RMS
ratio, activation RMS and maximum attention logit per layer, and loss per source for mixtures.

Alerts (`alert` events and a console line): a throughput drop (data wait or compute?), grad-norm
growth and z growth, each judged against the run's own recent history.
"""

from __future__ import annotations

import math
import re
import resource
import statistics
from collections import defaultdict, deque
from contextlib import nullcontext

import torch

from crucible.model.moe import moe_stats
from crucible.model.rope import apply_rope
from crucible.train.callbacks.base import Callback
from crucible.train.distributed import all_reduce_sum
from crucible.train.state import Run, StepResult

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> str:
    m = _LAYER.search(name)
    if m:
        return f"layer{int(m.group(1)):02d}"
    return name.split(".")[-2] if "." in name else name


def host_memory_gib() -> float:
    """Resident set size of this process (peak where the current value is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**30
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _distinct_shards(t: torch.Tensor) -> int:
    """How many different pieces of `t` the ranks hold (1: every rank holds all of it)."""
    if not hasattr(t, "device_mesh"):
        return 1
    n = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            n *= t.device_mesh.size(dim)
    return n


class MonitorCallback(Callback):
    def __init__(self, run: Run) -> None:
        self.cfg = run.cfg.monitor
        self.tok_s: deque[float] = deque(maxlen=20)
        self.data_share: deque[float] = deque(maxlen=20)
        self.gnorm: deque[float] = deque(maxlen=64)
        self.z: deque[float] = deque(maxlen=64)
        self.alerted: dict[str, int] = {}
        self._hooks: list = []
        self._acts: dict[str, float] = {}
        self._logits: dict[str, float] = {}
        self._batches: list = []
        self._before: dict[str, torch.Tensor] = {}
        self._seconds = self._data = 0.0
        self._steps = 0

    def _detailed(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    # -- detailed snapshots

    def on_step_start(self, run: Run) -> None:
        if not self._detailed(run.step + 1):
            return
        for name, module in run.model.named_modules():
            if re.fullmatch(r"(?:.*\.)?layers\.\d+", name):
                self._hooks.append(module.register_forward_hook(self._activation_hook(name)))
            if name.endswith("self_attn"):
                hook = self._logit_hook(name)
                self._hooks.append(module.register_forward_pre_hook(hook))

    def _activation_hook(self, name: str):
        def hook(module, args, output):
            if layer_of(name + ".") not in self._acts:  # the first micro-batch is enough
                x = output[0] if isinstance(output, tuple) else output  # MoE blocks: (x, aux)
                x = x.detach().float()
                self._acts[layer_of(name + ".")] = float(x.square().mean().sqrt())

        return hook

    def _logit_hook(self, name: str):
        def hook(module, args):
            key = layer_of(name + ".")
            if key in self._logits:
                return
            x, cos, sin = args[0][:1].detach(), args[1][:1], args[2][:1]  # the first sequence
            with torch.no_grad():
                B, T, _ = x.shape
                q = module.q_proj(x).view(B, T, module.num_heads, -1)[..., : module.head_dim]
                k = module.k_proj(x).view(B, T, module.num_kv_heads, module.head_dim)
                if module.q_norm is not None:
                    q, k = module.q_norm(q), module.k_norm(k)
                q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
                if module.use_rope:
                    q, k = (
                        apply_rope(q, cos.float(), sin.float()),
                        apply_rope(k, cos.float(), sin.float()),
                    )
                k = k.repeat_interleave(module.num_heads // module.num_kv_heads, dim=1)
                scores = (q @ k.transpose(-1, -2)) / math.sqrt(module.head_dim)
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                self._logits[key] = float(scores.masked_fill(~causal, -math.inf).max())

        return hook

    def on_batches(self, run: Run, step: int, batches: list) -> list:
        if self._detailed(step) and any(b.source_ids is not None for b in batches):
            self._batches = batches
        return batches

    def before_update(self, run: Run, result: StepResult) -> None:
        if not self._detailed(result.step):
            return
        self._before = {
            n: _local(p.detach()).float().clone() for n, p in run.model.named_parameters()
        }
        # Gradients were clipped in place; scale back to the norms the step actually produced.
        clip = run.cfg.optim.clip_grad
        scale = result.grad_norm / clip if clip and result.grad_norm > clip else 1.0
        self._grad_sq = self._per_layer(
            run, {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}
        )
        self._grad_scale = scale

    def _per_layer(
        self, run: Run, tensors: dict[str, torch.Tensor]
    ) -> dict[str, tuple[float, float]]:
        """layer -> (sum of squares, element count), summed over ranks for sharded tensors."""
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for name, t in tensors.items():
            local = _local(t).detach().float()
            # Summed over all ranks below: count each piece once (TP groups repeat FSDP shards).
            share = _distinct_shards(t) / run.info.world_size
            s = sums[layer_of(name)]
            s[0] += float(local.square().sum()) * share
            s[1] += local.numel() * share
        keys = sorted(sums)
        flat = all_reduce_sum([v for k in keys for v in sums[k]], run.device)
        return {k: (flat[2 * i], flat[2 * i + 1]) for i, k in enumerate(keys)}

    def _detail(self, run: Run, result: StepResult) -> None:
        values: dict[str, float] = {}
        if self._before:
            params = {n: p for n, p in run.model.named_parameters()}
            after = self._per_layer(run, params)
            updates = self._per_layer(
                run, {n: _local(params[n].detach()).float() - b for n, b in self._before.items()}
            )
            for layer, (sq, n) in after.items():
                rms = math.sqrt(sq / max(n, 1))
                values[f"param_rms/{layer}"] = rms
                u_sq, u_n = updates.get(layer, (0.0, 1.0))
                values[f"update_ratio/{layer}"] = math.sqrt(u_sq / max(u_n, 1)) / max(rms, 1e-12)
            for layer, (sq, _) in self._grad_sq.items():
                values[f"grad_norm/{layer}"] = math.sqrt(sq) * self._grad_scale
            self._before = {}
        values.update({f"act_rms/{k}": v for k, v in sorted(self._acts.items())})
        values.update({f"max_attn_logit/{k}": v for k, v in sorted(self._logits.items())})
        if self._batches:
            values.update(self._loss_per_source(run))
        if values:
            run.log("monitor_detail", result.step, **values)
        for h in self._hooks:
            h.remove()
        self._hooks, self._acts, self._logits, self._batches = [], {}, {}, []

    @torch.no_grad()
    def _loss_per_source(self, run: Run) -> dict[str, float]:
        names = list(getattr(run.loader, "names", []))
        sums = torch.zeros(2 * len(names), dtype=torch.float64)
        for batch in self._batches:
            b = batch.to(run.device)
            with torch.autocast(run.device.type, dtype=run.amp) if run.amp else nullcontext():
                out = run.model(b.tokens, b.targets, doc_ids=b.doc_ids, reduction="none")
            per_row = out.loss.float().mean(dim=1).double().cpu()
            for row, s in enumerate(batch.source_ids.tolist()):
                sums[2 * s] += per_row[row]
                sums[2 * s + 1] += 1
        flat = all_reduce_sum(sums.tolist(), run.device)
        return {
            f"loss/{name}": flat[2 * i] / flat[2 * i + 1]
            for i, name in enumerate(names)
            if flat[2 * i + 1]
        }

    # -- every step

    def on_step_end(self, run: Run, result: StepResult) -> None:
        if self._detailed(result.step):
            self._detail(run, result)
        self._steps += 1
        self._seconds += result.data_seconds + result.compute_seconds
        self._data += result.data_seconds
        if result.finite and not result.skipped:
            self.gnorm.append(result.grad_norm)
            self.z.append(result.z_loss)
        if result.step % run.cfg.train.log_every:
            return
        values = {"host_memory_gib": host_memory_gib()}
        values.update(moe_stats(run.model))  # MoE: expert load per layer (this rank); {} if dense
        if run.device.type == "cuda":
            values["device_memory_gib"] = torch.cuda.memory_allocated(run.device) / 2**30
            values["device_peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        run.log("monitor", result.step, **values)
        tok_s = run.tokens_per_step * self._steps / max(self._seconds, 1e-9)
        share = self._data / max(self._seconds, 1e-9)
        self._steps, self._seconds, self._data = 0, 0.0, 0.0
        if self.cfg.alerts:
            self._alerts(run, result.step, tok_s, share)
        self.tok_s.append(tok_s)
        self.data_share.append(share)

    def _alerts(self, run: Run, step: int, tok_s: float, share: float) -> None:
        if len(self.tok_s) >= 5:
            usual = statistics.median(self.tok_s)
            if tok_s < self.cfg.throughput_drop * usual:
                usual_share = statistics.median(self.data_share)
                if share > max(0.2, 2 * usual_share):
                    cause = (
                        f"data loading: the loader's share of step time rose from "
                        f"{usual_share:.0%} to {share:.0%} (storage, shard cache, index growth)"
                    )
                else:
                    cause = (
                        f"compute: step time grew while data wait stayed at {share:.0%} (other "
                        "processes on the device or host, throttling, a slower kernel path)"
                    )
                self._alert(
                    run, step, "throughput_drop", f"{tok_s:,.0f} tok/s vs usual {usual:,.0f}", cause
                )
        n = len(self.gnorm)
        if n >= 32:
            self._growth(run, step, "grad_norm_growth", list(self.gnorm),
                         "grad norm", "learning rate too high for this phase, or a spike building")  # fmt: skip
            self._growth(run, step, "z_growth", list(self.z),
                         "z (logsumexp^2)", "output logits drifting upward: add z_loss or QK-norm")  # fmt: skip

    def _growth(
        self, run: Run, step: int, kind: str, values: list[float], what: str, cause: str
    ) -> None:
        half = len(values) // 2
        early, late = statistics.median(values[:half]), statistics.median(values[half:])
        if early > 0 and late > self.cfg.growth_factor * early:
            self._alert(
                run, step, kind, f"{what} grew {late / early:.1f}x over {len(values)} steps", cause
            )

    def _alert(self, run: Run, step: int, kind: str, message: str, cause: str) -> None:
        last = self.alerted.get(kind)
        if last is not None and step - last < 10 * run.cfg.train.log_every:
            return  # one alert per kind per stretch, not one per log line
        self.alerted[kind] = step
        run.log("alert", step, kind=kind, message=message, cause=cause)
        run.say(f"  [yellow]alert[/] step {step}: {message} - probable cause: {cause}")
