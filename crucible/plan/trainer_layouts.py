"""The bridge between the planner's layouts and what `crucible train` runs.

The trainer runs data parallelism as DDP (ZeRO-0) or FSDP2 (ZeRO-3), tensor parallelism with
DTensor (heads and MLP columns split, the embedding and output head whole on every TP rank,
optional sequence parallelism), TP x FSDP2 on a 2-D mesh, and activation checkpointing (none,
selective, full, every N-th block). It runs no pipeline or context parallelism, no ZeRO-1/2,
and no TP x DDP. `trainer_support` says why a layout is outside that set; `layout_of` and
`config_for` translate between a training config and a planner layout.
"""

from __future__ import annotations

from dataclasses import replace

from crucible.config import ModelConfig, RunConfig
from crucible.plan.memory import Layout

NOT_SUPPORTED = "not supported by the trainer"


def trainer_support(cfg: ModelConfig, layout: Layout) -> str | None:
    """None when `crucible train` can run `layout`, else the reason it cannot."""
    if layout.pp > 1:
        return "pipeline parallelism"
    if layout.cp > 1:
        return "context parallelism"
    if layout.dp > 1 and layout.zero in (1, 2):
        return f"ZeRO-{layout.zero} (runs ZeRO-0 as DDP, ZeRO-3 as FSDP2)"
    if layout.tp > 1:
        if cfg.num_heads % layout.tp or cfg.num_kv_heads % layout.tp:
            return f"TP={layout.tp} must divide the heads and KV heads (no KV-head replication)"
        if cfg.qk_norm:
            return "TP with QK-norm"
        if layout.dp > 1 and layout.zero == 0:
            return "TP x DDP (use ZeRO-3: TP x FSDP2)"
        if layout.vocab_parallel:
            return "a vocabulary-parallel embedding"
    return None


def as_trainer_runs(layout: Layout) -> Layout:
    """The layout as the trainer would run it: whole embedding, sequence parallel under TP."""
    return replace(layout, vocab_parallel=False, sequence_parallel=layout.tp > 1)


def layout_of(cfg: RunConfig, world: int) -> Layout:
    """The planner layout of a training config run on `world` processes."""
    d, t = cfg.distributed, cfg.train
    dp = world // d.tp
    zero = 3 if (d.strategy == "fsdp" and world > 1) else 0
    return Layout(
        dp=dp,
        tp=d.tp,
        zero=zero,
        micro_batch=t.micro_batch_size,
        seq_len=t.seq_len,
        grad_accum=max(1, t.global_batch_size // (t.micro_batch_size * dp)),
        recompute=t.activation_checkpointing,
        recompute_every=t.activation_checkpointing_every,
        sequence_parallel=d.sequence_parallel,
        vocab_parallel=False,
    )


def config_for(cfg: RunConfig, layout: Layout) -> RunConfig:
    """`cfg` with the layout's parallelism, micro-batch and recomputation (a training config
    `crucible train` loads; launch it with `torchrun --nproc_per_node <dp x tp>`)."""
    why = trainer_support(cfg.model, layout)
    if why is not None:
        raise ValueError(f"layout {layout.describe()}: {NOT_SUPPORTED} ({why})")
    data = cfg.model_dump(mode="json")
    data["distributed"].update(
        strategy="fsdp" if layout.zero == 3 else "ddp",
        tp=layout.tp,
        dp=layout.dp,
        sequence_parallel=layout.tp > 1,
    )
    data["train"].update(
        micro_batch_size=layout.micro_batch,
        seq_len=layout.seq_len,
        activation_checkpointing=layout.recompute,
        activation_checkpointing_every=layout.recompute_every,
    )
    data["model"]["max_seq_len"] = max(data["model"]["max_seq_len"], layout.seq_len)
    return RunConfig.model_validate(data)
