"""Training memory per GPU: weights, master weights, gradients, optimizer state and activations,
for a parallel layout (ZeRO-0/1/2/3, tensor, pipeline, context parallelism) and a timeline whose
peak is the second forward-backward, once the optimizer state exists.

Two precision schemes:
- "mixed" (nanotron, Megatron): bf16 weights for compute, fp32 master weights, fp32 gradient
  accumulators, fp32 Adam moments: 2 + 4 + 4 + 8 = 18 bytes per parameter.
- "autocast" (crucible's engine, FSDP2's default): fp32 weights, fp32 gradients, fp32 Adam moments
  (16 bytes per parameter), plus the bf16 copies autocast makes of each weight in the forward pass,
  which the matmuls keep for backward.

Activations are an explicit list of the tensors a Llama block saves for backward (with a fused,
flash-style attention kernel that never stores the seq x seq scores); see `activation_tensors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from crucible.config import ModelConfig, MoEConfig
from crucible.plan.params import mixer_params_per_layer

MiB = 2**20
GiB = 2**30
Recompute = Literal["none", "selective", "full"]
Precision = Literal["mixed", "autocast"]
RECOMPUTE_MODES = ("none", "selective", "full")


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the failing constraint."""


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = (
        0  # 0: replicated; 1: shard optimizer state (and fp32 master); 2: + grads; 3: + weights
    )
    micro_batch: int = 1
    seq_len: int = 4096
    grad_accum: int = 1
    recompute: Recompute = "none"
    sequence_parallel: bool = True  # with TP: norms and residuals are split over TP ranks too
    recompute_every: int = 1  # recompute blocks 0, N, 2N, ...; the others keep everything
    vocab_parallel: bool = True  # TP splits the embedding / output head (Megatron); crucible: no

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def describe(self) -> str:
        every = f"/{self.recompute_every}" if self.recompute_every > 1 else ""
        return (
            f"DP={self.dp} TP={self.tp} PP={self.pp} CP={self.cp} ZeRO-{self.zero} "
            f"micro={self.micro_batch} accum={self.grad_accum} recompute={self.recompute}{every}"
        )


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """Raise LayoutError naming the first constraint the layout breaks."""
    for name in ("dp", "tp", "pp", "cp", "micro_batch", "grad_accum", "recompute_every"):
        if getattr(layout, name) < 1:
            raise LayoutError(f"{name} must be >= 1 (got {getattr(layout, name)})")
    if layout.zero not in (0, 1, 2, 3):
        raise LayoutError(f"ZeRO stage must be 0, 1, 2 or 3 (got {layout.zero})")
    if layout.recompute not in RECOMPUTE_MODES:
        raise LayoutError(f"recompute must be one of {RECOMPUTE_MODES} (got {layout.recompute})")
    if cfg.num_heads % layout.tp:
        raise LayoutError(f"TP={layout.tp} does not divide num_heads={cfg.num_heads}")
    if cfg.num_kv_heads % layout.tp and layout.tp % cfg.num_kv_heads:
        raise LayoutError(
            f"TP={layout.tp} and num_kv_heads={cfg.num_kv_heads}: neither divides the other"
        )
    if cfg.intermediate_size % layout.tp:
        raise LayoutError(f"TP={layout.tp} does not divide intermediate_size")
    if layout.pp > cfg.num_layers:
        raise LayoutError(f"PP={layout.pp} exceeds num_layers={cfg.num_layers}")
    if layout.seq_len % (2 * layout.cp if layout.cp > 1 else 1):
        raise LayoutError(
            f"CP={layout.cp}: seq_len {layout.seq_len} must divide into 2 x CP chunks"
        )


# --------------------------------------------------------------------------- parameters


def params_per_gpu(cfg: ModelConfig, layout: Layout, moe: MoEConfig | None = None) -> int:
    """Parameters held by the most loaded GPU before ZeRO sharding (TP and PP split them).

    TP splits attention, MLP and (vocab_parallel) the embedding; norms are replicated. PP gives
    each stage ceil(layers / pp) blocks; the first stage also holds the embedding, the last the
    final norm and the output head (a copy of the embedding when tied and PP > 1).
    """
    d, tp = cfg.hidden_size, layout.tp
    moe = moe if moe is not None else cfg.moe
    norm = 2 * d + (2 * cfg.dim_per_head if cfg.qk_norm else 0)
    if moe is None:
        mlp = 3 * d * cfg.intermediate_size
    else:
        mlp = (moe.num_experts + moe.shared_experts) * 3 * d * moe.expert_intermediate_size
        mlp += d * moe.num_experts * tp  # the router is replicated, not split
    layer = (mixer_params_per_layer(cfg) + mlp) // tp + norm
    embed = cfg.vocab_size * d // (tp if layout.vocab_parallel else 1)
    blocks = math.ceil(cfg.num_layers / layout.pp)
    head = 0 if cfg.tie_embeddings and layout.pp == 1 else embed
    if layout.pp == 1:
        return blocks * layer + embed + d + head
    return max(blocks * layer + embed, blocks * layer + d + head)


# --------------------------------------------------------------------------- activations


def activation_tensors(
    cfg: ModelConfig, precision: Precision = "mixed", recompute: Recompute = "none"
) -> dict[str, float]:
    """Bytes one block keeps for backward, per token, before any TP/CP split.

    mixed (fused kernels, bf16 activations): each RMSNorm keeps its input and output, attention
    keeps q, k, v and its output (which the output projection reads in place), the SwiGLU keeps
    gate, up, silu(gate) and the product.
    autocast (crucible's engine, checked against autograd's saved tensors in the tests): the
    residual stream is fp32, so each RMSNorm keeps an fp32 input and an fp32 normalised value,
    and its output is cast to bf16 once for all the projections that read it
    (`crucible.model.autocast.autocast_input`); SDPA returns its output in the
    [tokens, heads x head_dim] layout, so the output projection reads it without a copy.
    selective: silu(gate) and the product are recomputed in backward from gate and up (a few %
    more FLOPs); under autocast the down projection's input cast goes too, as it is recomputed.
    full: only the block input is kept; the block is re-run in backward.
    """
    a, h, i = 2, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.dim_per_head, cfg.num_kv_heads * cfg.dim_per_head
    auto = precision == "autocast"
    if recompute == "full":
        return {"block input": (4 if auto else a) * h}
    t = {
        "attention norm": (8 * h + a * h) if auto else 2 * a * h,
        "q, k, v after RoPE": a * (q + 2 * kv),
        "attention output + logsumexp": a * q + 4 * cfg.num_heads,
        "MLP norm": (8 * h + a * h) if auto else 2 * a * h,
        "gate and up projections": a * 2 * i,
    }
    if recompute == "none":
        t["silu(gate) and product (down input)"] = a * 2 * i
    return t


def checkpointed_blocks(num_blocks: int, layout: Layout) -> int:
    """Blocks (of `num_blocks`) the layout recomputes: 0, N, 2N, ... with N = recompute_every."""
    if layout.recompute == "none":
        return 0
    return math.ceil(num_blocks / layout.recompute_every)


@dataclass(frozen=True)
class Activations:
    per_layer_per_token: dict[str, float]
    layers_held: float  # block-equivalents kept at the peak (PP: micro-batches in flight)
    tokens: int  # tokens per GPU per micro-batch after CP
    split: int  # TP (with sequence parallelism) divides the tensors
    extra: dict[str, float]  # outside the blocks: final norm, logits, full-recompute working set

    @property
    def total(self) -> float:
        per_token = sum(self.per_layer_per_token.values())
        return per_token * self.tokens * self.layers_held / self.split + sum(self.extra.values())

    @property
    def kept_after_forward(self) -> float:
        """What the forward pass leaves for backward (without the block being recomputed)."""
        return self.total - self.extra.get("recomputed block", 0.0)


def activations(
    cfg: ModelConfig,
    layout: Layout,
    precision: Precision = "mixed",
    logits: Literal["chunked", "full"] = "chunked",
) -> Activations:
    tokens = layout.micro_batch * layout.seq_len // layout.cp
    blocks = math.ceil(cfg.num_layers / layout.pp)
    tensors = activation_tensors(cfg, precision, layout.recompute)
    n_ckpt = checkpointed_blocks(blocks, layout)
    if 0 < n_ckpt < blocks:  # every N-th block: the per-block average of the two kinds
        plain = activation_tensors(cfg, precision, "none")
        tensors = {
            k: (n_ckpt * tensors.get(k, 0) + (blocks - n_ckpt) * plain.get(k, 0)) / blocks
            for k in {**plain, **tensors}
        }
    in_flight = min(layout.pp, layout.grad_accum) if layout.pp > 1 else 1  # 1F1B warm-up depth
    split = layout.tp if layout.sequence_parallel else 1
    # autocast: the final norm keeps its fp32 input and normalised value, and the fused loss
    # keeps the norm's (fp32) output; the RoPE tables (fp32 cos and sin, shared by all blocks)
    # and the int64 targets live until backward too (measured: tests/test_activation_...py).
    final_norm = (4 + 4 + 4) if precision == "autocast" else 2 + 2  # bytes per hidden unit
    extra: dict[str, float] = {"final norm": final_norm * cfg.hidden_size * tokens / split}
    if precision == "autocast":
        extra["RoPE tables and targets"] = (2 * 4 * cfg.dim_per_head + 8) * tokens
    if logits == "full":  # fp32 logits kept for the softmax backward, vocab-parallel under TP
        extra["logits (fp32)"] = (
            4 * cfg.vocab_size * tokens / (layout.tp if layout.vocab_parallel else 1)
        )
    if layout.recompute == "full":  # the block being recomputed holds its own tensors
        one_block = sum(activation_tensors(cfg, precision, "none").values())
        extra["recomputed block"] = one_block * tokens / split
    return Activations(tensors, blocks * in_flight, tokens, split, extra)


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    layout: Layout
    precision: Precision
    params_per_gpu: int
    weights: float  # bf16 compute weights (mixed) or fp32 weights (autocast)
    master_weights: float  # fp32 master copy (mixed only)
    gradients: float
    optimizer: float  # Adam's two fp32 moments
    activations: Activations
    autocast_copies: float = 0.0  # bf16 weight copies autocast keeps for backward
    timeline: list[tuple[str, float]] = field(default_factory=list)

    @property
    def states(self) -> float:
        return self.weights + self.master_weights + self.gradients + self.optimizer

    @property
    def peak(self) -> float:
        return max(v for _, v in self.timeline)

    def fits(self, memory_gib: float, reserve: float = 0.05) -> bool:
        """Whether the peak fits, keeping `reserve` of the card for the CUDA context and
        allocator fragmentation."""
        return self.peak <= memory_gib * GiB * (1 - reserve)


def estimate_memory(
    cfg: ModelConfig,
    layout: Layout,
    precision: Precision = "mixed",
    moe: MoEConfig | None = None,
    logits: Literal["chunked", "full"] = "chunked",
) -> MemoryEstimate:
    """Bytes per GPU of each training-state component and the timeline of the first two steps."""
    check_layout(cfg, layout)
    p = params_per_gpu(cfg, layout, moe)
    dp, z = layout.dp, layout.zero
    shard = {k: (dp if z >= s else 1) for k, s in (("opt", 1), ("grad", 2), ("weight", 3))}
    if precision == "mixed":
        weights = 2 * p / shard["weight"]
        master = 4 * p / shard["opt"]  # ZeRO-1 shards the fp32 master with the moments
        copies = 0.0
    else:
        weights, master = 4 * p / shard["weight"], 0.0
        # From the gathered weights; norm gains multiply in fp32 and are never cast.
        copies = 2 * (p - _norm_params(cfg, layout) - _recomputed_weights(cfg, layout, moe))
    grads = 4 * p / shard["grad"]
    opt = 8 * p / shard["opt"]
    act = activations(cfg, layout, precision, logits)
    fwd_bwd = act.total + copies
    if precision == "mixed":
        timeline = [
            ("model init", weights),
            ("gradient accumulators allocated", weights + master + grads),
            ("first forward-backward peak", weights + master + grads + fwd_bwd),
            ("after optimizer step", weights + master + grads + opt),
            ("second forward-backward peak", weights + master + grads + opt + fwd_bwd),
        ]
    else:  # grads appear during the first backward; Adam allocates its moments at step 1
        timeline = [
            ("model init", weights),
            ("first forward-backward peak", weights + grads + fwd_bwd),
            ("after optimizer step", weights + grads + opt),
            ("second forward-backward peak", weights + grads + opt + fwd_bwd),
        ]
    return MemoryEstimate(layout, precision, p, weights, master, grads, opt, act, copies, timeline)


def _norm_params(cfg: ModelConfig, layout: Layout) -> int:
    per_block = 2 * cfg.hidden_size + (2 * cfg.dim_per_head if cfg.qk_norm else 0)
    return math.ceil(cfg.num_layers / layout.pp) * per_block + cfg.hidden_size


def _recomputed_weights(cfg: ModelConfig, layout: Layout, moe: MoEConfig | None) -> float:
    """Parameters whose autocast bf16 copies are not kept for backward: the weights used inside
    a recomputed region are cast again when it is re-run (full: the whole block's projections;
    selective: the down projection)."""
    if moe is not None:
        return 0.0
    blocks = math.ceil(cfg.num_layers / layout.pp)
    d, i = cfg.hidden_size, cfg.intermediate_size
    if layout.recompute == "full":
        per_block = mixer_params_per_layer(cfg) + 3 * d * i
    elif layout.recompute == "selective":
        per_block = d * i
    else:
        return 0.0
    return checkpointed_blocks(blocks, layout) * per_block / layout.tp
