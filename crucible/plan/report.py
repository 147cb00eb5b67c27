"""The plan of a run as Markdown: parameters, FLOPs, KV cache, memory per GPU, compute budget,
compute-optimal sizing and (optionally) the ranked parallel layouts. `crucible plan` prints it."""

from __future__ import annotations

from dataclasses import dataclass

from crucible.config import MoEConfig, RunConfig
from crucible.plan.budget import DEFAULT_MFU, ComputePlan, gpu_days_for_tokens, tokens_for_budget
from crucible.plan.flops import attention_flops_per_token, matmul_params
from crucible.plan.hardware import Accelerator
from crucible.plan.kvcache import kv_cache_bytes_per_sequence, kv_cache_bytes_per_token
from crucible.plan.memory import Layout, MiB, Precision, estimate_memory
from crucible.plan.params import count_params
from crucible.plan.scaling import HOFFMANN_2022, compute_optimal
from crucible.plan.search import Cluster, search_layouts
from crucible.plan.trainer_layouts import NOT_SUPPORTED


@dataclass(frozen=True)
class PlanRequest:
    accelerator: Accelerator
    layout: Layout
    gpus: int | None = None  # default: the layout's world size
    days: float | None = None  # give days to get a GPU count instead
    tokens: float | None = None  # default: steps x tokens per step of the config
    mfu: float = DEFAULT_MFU
    price_per_gpu_hour: float | None = None
    peak_tflops: float | None = None
    budget_gpu_hours: float | None = None
    budget_cost: float | None = None
    precision: Precision = "mixed"
    moe: MoEConfig | None = None
    search: bool = False
    top: int = 5
    flops: str = "6N+attention"  # or "6N": the playbook's and Chinchilla's count
    params: float | None = None  # N of 6N instead of the config's matmul parameters
    trainer_only: bool = False  # rank only the layouts `crucible train` runs


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _sci(x: float) -> str:
    return f"{x:.3g}"


def plan_markdown(cfg: RunConfig, req: PlanRequest) -> str:
    m, seq = cfg.model, req.layout.seq_len
    p = count_params(m, req.moe)
    out = [f"# Plan: {cfg.name}", "", "## Parameters", "", "| component | parameters | share |"]
    out.append("|---|---:|---:|")
    for k, share in p.shares().items():
        if getattr(p, k):
            out.append(f"| {k} | {_n(getattr(p, k))} | {share:.1%} |")
    out.append(f"| **total** | **{_n(p.total)}** | 100% |")
    if p.mlp_active is not None:
        out.append(f"| active per token | {_n(p.active)} | {p.active / p.total:.1%} |")

    if req.flops not in ("6N", "6N+attention"):
        raise ValueError(f"--flops {req.flops!r}: must be 6N or 6N+attention")
    n_flops = req.params or matmul_params(m, req.moe)
    att = attention_flops_per_token(m, seq) if req.flops == "6N+attention" else 0.0
    fpt = 6 * n_flops + att
    what = "given with --params" if req.params else "matmul parameters, output head included"
    out += [
        "",
        f"## FLOPs per token (sequence {seq}, counted as {req.flops})",
        "",
        f"- 6N (N = {_n(n_flops)} {what}): {_sci(6 * n_flops)}",
        f"- causal attention (QK^T, AV; forward + backward): {_sci(att)}"
        + ("" if att else " (not counted: --flops 6N)"),
        f"- **training FLOPs per token: {_sci(fpt)}**",
        f"- KV cache (bf16): {_n(kv_cache_bytes_per_token(m))} bytes per token, "
        f"{kv_cache_bytes_per_sequence(m, m.max_seq_len) / MiB:,.1f} MiB per "
        f"{m.max_seq_len}-token sequence",
    ]

    lay = req.layout
    mem = estimate_memory(m, lay, req.precision, req.moe)
    gib = req.accelerator.memory_gib
    out += ["", f"## Memory per GPU ({lay.describe()}, {req.precision} precision)", ""]
    out += ["| component | MiB |", "|---|---:|"]
    rows = [
        ("bf16 weights" if req.precision == "mixed" else "fp32 weights", mem.weights),
        ("fp32 master weights", mem.master_weights),
        ("gradients (fp32)", mem.gradients),
        ("optimizer state (Adam, fp32)", mem.optimizer),
        ("bf16 weight copies (autocast)", mem.autocast_copies),
        ("activations", mem.activations.total),
    ]
    out += [f"| {k} | {v / MiB:,.0f} |" for k, v in rows if v]
    out += ["", "| moment | MiB |", "|---|---:|"]
    out += [f"| {k} | {v / MiB:,.0f} |" for k, v in mem.timeline]
    verdict = "fits" if mem.fits(gib) else "DOES NOT FIT"
    out.append("")
    out.append(
        f"Peak {mem.peak / MiB:,.0f} MiB at the second forward-backward: **{verdict}** in "
        f"{gib:g} GiB per {req.accelerator.name} (5% kept for the CUDA context)."
    )

    tokens = req.tokens or cfg.train.steps * cfg.train.tokens_per_step
    gpus = req.gpus or (None if req.days else lay.world_size)
    plan: ComputePlan = gpu_days_for_tokens(
        tokens, fpt, req.accelerator, req.mfu, gpus, req.days, req.price_per_gpu_hour,
        peak_tflops=req.peak_tflops,
    )  # fmt: skip
    cost = f", ${plan.cost:,.0f}" if plan.cost is not None else ""
    out += [
        "",
        "## Compute",
        "",
        f"- {_sci(tokens)} tokens x {_sci(fpt)} FLOPs/token = {_sci(plan.total_flops)} FLOPs",
        f"- peak used: {plan.peak_source}; MFU {plan.mfu:.0%} -> "
        f"{plan.tokens_per_second_per_gpu:,.0f} tokens/s per GPU",
        f"- **{plan.gpus} GPUs x {plan.days:,.1f} days = {plan.gpu_hours:,.0f} GPU-hours{cost}**",
    ]
    if req.budget_gpu_hours or req.budget_cost:
        bought = tokens_for_budget(
            fpt, req.accelerator, req.mfu, req.budget_gpu_hours, req.budget_cost,
            req.price_per_gpu_hour, peak_tflops=req.peak_tflops,
        )  # fmt: skip
        out.append(
            f"- the budget buys {_sci(bought)} tokens ({bought / p.total:,.0f} per parameter)"
        )
    c = 6 * p.total * tokens
    n20, d20 = compute_optimal(c)
    nh, dh = HOFFMANN_2022.optimal(c)
    out += [
        "",
        "## Compute-optimal sizing (C = 6ND)",
        "",
        f"- this plan: {tokens / p.total:,.0f} tokens per parameter "
        f"(Chinchilla-optimal is about 20; small models are deliberately over-trained for cheaper "
        "inference)",
        f"- the same C = {_sci(c)} FLOPs, 20 tokens/parameter: N = {_sci(n20)}, D = {_sci(d20)}",
        f"- Hoffmann et al. 2022 fitted law: N = {_sci(nh)}, D = {_sci(dh)}, predicted loss "
        f"{HOFFMANN_2022.loss(nh, dh):.3f} vs {HOFFMANN_2022.loss(p.total, tokens):.3f} for this "
        "plan",
    ]
    if req.search:
        world = req.gpus or plan.gpus
        cands = search_layouts(
            m, Cluster(req.accelerator, world), cfg.train.global_batch_size, seq,
            precision=req.precision, moe=req.moe, trainer_only=req.trainer_only,
        )  # fmt: skip
        out += [
            "",
            f"## Parallel layouts for {world} GPUs, global batch {cfg.train.global_batch_size} x "
            f"{seq} tokens ({len(cands)} fit; model-ranked, benchmark the top few)",
            "",
            "| layout | peak MiB | predicted tokens/s/GPU | exposed comm + bubble | trainer |",
            "|---|---:|---:|---:|---|",
        ]
        for cand in cands[: req.top]:
            over = sum(v for k, v in cand.breakdown.items() if k != "compute")
            out.append(
                f"| {cand.layout.describe()} | {cand.memory.peak / MiB:,.0f} | "
                f"{cand.tokens_per_second_per_gpu:,.0f} | {over / cand.step_seconds:.1%} | "
                f"{'runs' if cand.unsupported is None else NOT_SUPPORTED + ': ' + cand.unsupported}"
                " |"
            )
        best = next((c for c in cands if c.unsupported is None), None)
        out += [
            "",
            f"Best layout `crucible train` runs: {best.layout.describe()} "
            f"({best.tokens_per_second_per_gpu:,.0f} tokens/s/GPU predicted; `--write-config` "
            "writes it as a training config)."
            if best
            else "None of these layouts is one `crucible train` runs.",
        ]
    return "\n".join(out) + "\n"
