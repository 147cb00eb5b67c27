"""Parallelism search: the DP x TP x PP x CP x micro-batch x ZeRO x recomputation layouts that fit
in memory and reach the target global batch, ranked by a throughput model.

The model is for *ranking candidates to benchmark*, as the playbook does (it ran each of its
candidates for a few steps): compute at a fixed kernel efficiency, plus the communication that
cannot hide behind compute (tensor-parallel all-reduces, the pipeline bubble, the data-parallel
gradient reduction beyond what the last backward pass covers). Links: NVLink within a node
(half the vendor's bidirectional figure each way), `inter_node_gbs` between nodes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from crucible.config import ModelConfig, MoEConfig
from crucible.plan.flops import train_flops_per_token
from crucible.plan.hardware import Accelerator, pcie_bandwidth_gbs
from crucible.plan.memory import (
    RECOMPUTE_MODES,
    Layout,
    LayoutError,
    MemoryEstimate,
    Precision,
    estimate_memory,
    params_per_gpu,
)
from crucible.plan.trainer_layouts import as_trainer_runs, trainer_support

# Extra compute per step for each recomputation mode: full re-runs the forward (2N of 6N),
# selective only the MLP's elementwise ops.
RECOMPUTE_COST = {"none": 1.0, "selective": 1.02, "full": 4 / 3}


def amdahl_speedup(serial_share: float, n: int) -> float:
    """Speedup on n workers when `serial_share` of the single-worker time cannot be split."""
    if not 0 <= serial_share <= 1:
        raise ValueError(f"serial (communication) share must be in [0, 1] (got {serial_share})")
    return 1 / (serial_share + (1 - serial_share) / n)


def amdahl_ceiling(serial_share: float) -> float:
    """The speedup no number of workers can exceed: 1 / serial share."""
    return float("inf") if serial_share == 0 else 1 / serial_share


@dataclass(frozen=True)
class Cluster:
    accelerator: Accelerator
    gpus: int
    gpus_per_node: int = 8
    inter_node_gbs: float = 50.0  # per GPU, one way (p5: 4 x 100 Gb/s EFA per GPU)
    kernel_efficiency: float = 0.6  # fraction of dense peak a large bf16 matmul reaches
    memory_reserve: float = 0.05

    @property
    def intra_node_gbs(self) -> float:
        acc = self.accelerator
        if acc.interconnect_gbs > 0:
            return acc.interconnect_gbs / 2
        return pcie_bandwidth_gbs(4, 16)  # no NVLink: GPUs talk over PCIe


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    step_seconds: float
    tokens_per_second_per_gpu: float
    breakdown: dict[str, float]  # seconds per step by cause
    unsupported: str | None = None  # why `crucible train` cannot run it (None: it can)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def predict_step(
    cfg: ModelConfig, layout: Layout, cluster: Cluster, global_batch: int, moe: MoEConfig | None
) -> dict[str, float]:
    """Seconds per optimizer step by cause, for the slowest GPU."""
    seq, world = layout.seq_len, layout.world_size
    peak = cluster.accelerator.peak_flops("bf16")
    micro_tokens = layout.micro_batch * seq // layout.cp
    efficiency = cluster.kernel_efficiency * micro_tokens / (micro_tokens + 512)  # small GEMMs
    flops = train_flops_per_token(cfg, seq, moe) * global_batch * seq / world
    compute = flops / (peak * efficiency) * RECOMPUTE_COST[layout.recompute]
    bubble = compute * (layout.pp - 1) / layout.grad_accum  # 1F1B
    intra, inter = cluster.intra_node_gbs * 1e9, cluster.inter_node_gbs * 1e9
    blocks = -(-cfg.num_layers // layout.pp)
    act_bytes = 2 * micro_tokens * cfg.hidden_size
    tp = 0.0
    if layout.tp > 1:  # 2 all-reduces forward, 2 backward per block per micro-batch
        link = intra if layout.tp <= cluster.gpus_per_node else inter
        per = 2 * (layout.tp - 1) / layout.tp * act_bytes / link
        tp = 4 * per * blocks * layout.grad_accum
    cp = 0.0
    if layout.cp > 1:  # ring attention passes K and V around; about half hides behind compute
        kv = 2 * 2 * micro_tokens * cfg.num_kv_heads * cfg.dim_per_head
        cp = 0.5 * 3 * (layout.cp - 1) * kv / intra * blocks * layout.grad_accum
    pp = 0.0
    if layout.pp > 1:  # activations and their gradients cross each stage boundary
        link = inter if layout.tp * layout.pp > cluster.gpus_per_node else intra
        pp = 2 * act_bytes / layout.tp / link * layout.grad_accum
    dp = 0.0
    if layout.dp > 1:
        shard = (layout.dp - 1) / layout.dp * 2 * params_per_gpu(cfg, layout, moe)  # bf16
        link = inter if world > cluster.gpus_per_node else intra
        hidden_by = compute * 2 / 3 / layout.grad_accum  # the last micro-batch's backward
        # ZeRO-0 all-reduces gradients (reduce-scatter + all-gather volume) during backward;
        # ZeRO-1/2 reduce-scatter them, then all-gather the updated weights after the step, which
        # nothing hides; ZeRO-3 gathers weights before each forward and backward, behind compute.
        reduce = (2 if layout.zero == 0 else 1) * shard / link
        dp = max(0.0, reduce - hidden_by)
        if layout.zero in (1, 2):
            dp += shard / link
        elif layout.zero == 3:
            dp += max(0.0, 2 * shard * layout.grad_accum / link - compute)
    return {"compute": compute, "pipeline bubble": bubble, "TP": tp, "CP": cp, "PP": pp, "DP": dp}


def search_layouts(
    cfg: ModelConfig,
    cluster: Cluster,
    global_batch: int,
    seq_len: int,
    micro_batches: tuple[int, ...] = (1, 2, 3, 4, 6, 8),
    zero_stages: tuple[int, ...] = (0, 1, 2, 3),
    recompute: tuple[str, ...] = RECOMPUTE_MODES,
    max_cp: int = 8,
    precision: Precision = "mixed",
    moe: MoEConfig | None = None,
    trainer_only: bool = False,
) -> list[Candidate]:
    """Every layout of `cluster.gpus` GPUs that reaches `global_batch` sequences and fits,
    fastest first. Raises ValueError saying why when none does.

    Layouts `crucible train` can run are evaluated as it runs them (embedding whole on every TP
    rank, sequence parallelism under TP); the others carry `unsupported` (the reason), or are
    left out with `trainer_only`."""
    world = cluster.gpus
    usable_gib = cluster.accelerator.memory_gib
    found: list[Candidate] = []
    rejected: dict[str, int] = {}
    smallest: MemoryEstimate | None = None
    tps = [t for t in _divisors(cluster.gpus_per_node) if world % t == 0]
    cps = [c for c in (1, 2, 4, 8, 16) if c <= max_cp and world % c == 0]
    for tp, cp in itertools.product(tps, cps):
        for pp in _divisors(world // (tp * cp)):
            dp = world // (tp * cp * pp)
            if pp > cfg.num_layers:
                continue
            for mbs, zero, rc in itertools.product(micro_batches, zero_stages, recompute):
                if global_batch % (dp * mbs):
                    rejected["global batch not a multiple of DP x micro-batch"] = (
                        rejected.get("global batch not a multiple of DP x micro-batch", 0) + 1
                    )
                    continue
                if zero and dp == 1:
                    continue  # ZeRO shards over DP; nothing to shard
                layout = Layout(dp, tp, pp, cp, zero, mbs, seq_len, global_batch // (dp * mbs), rc)
                why = trainer_support(cfg, as_trainer_runs(layout))
                if why is None:
                    layout = as_trainer_runs(layout)
                elif trainer_only:
                    rejected["not supported by the trainer"] = (
                        rejected.get("not supported by the trainer", 0) + 1
                    )
                    continue
                try:
                    mem = estimate_memory(cfg, layout, precision, moe)
                except LayoutError as e:
                    reason = str(e).split(":")[0] if ":" in str(e) else str(e)
                    rejected[reason] = rejected.get(reason, 0) + 1
                    continue
                if smallest is None or mem.peak < smallest.peak:
                    smallest = mem
                if not mem.fits(usable_gib, cluster.memory_reserve):
                    rejected["does not fit in memory"] = (
                        rejected.get("does not fit in memory", 0) + 1
                    )
                    continue
                parts = predict_step(cfg, layout, cluster, global_batch, moe)
                step = sum(parts.values())
                tps_gpu = global_batch * seq_len / step / world
                found.append(Candidate(layout, mem, step, tps_gpu, parts, why))
    if not found:
        why = "; ".join(f"{k} ({v} layouts)" for k, v in sorted(rejected.items()))
        best = (
            f" The smallest peak found is {smallest.peak / 2**30:.1f} GiB "
            f"({smallest.layout.describe()}) against {usable_gib:g} GiB per "
            f"{cluster.accelerator.name}."
            if smallest
            else ""
        )
        raise ValueError(
            f"no layout of {world} x {cluster.accelerator.name} reaches a global batch of "
            f"{global_batch} sequences and fits: {why}.{best} Try more GPUs, a card with more "
            "memory, or a global batch with more divisors."
        )
    # Fastest first; among equals prefer less model parallelism and sharding (fewer moving parts).
    found.sort(
        key=lambda c: (
            -round(c.tokens_per_second_per_gpu, 6),
            c.layout.tp * c.layout.pp * c.layout.cp,
            c.layout.zero,
        )
    )
    return found
