"""Typed configuration: pydantic models, YAML loading, dotted overrides and presets.

A run is described by one `RunConfig`. It is built from a YAML file (or a shipped preset name) plus
`a.b.c=value` overrides from the command line. Unknown keys are errors, and every validation error
names the file, the field path and what is allowed, so a typo never trains the wrong model silently.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message meant to be shown to the user as is."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScalingConfig(_Strict):
    """RoPE scaling for contexts longer than the pretraining length (transformers' definitions).

    linear: positions divided by `factor` (Kaiokendev / Chen et al. position interpolation).
    dynamic: NTK-aware base rescaling, recomputed from the current length once it exceeds
      `original_max_position_embeddings` (which defaults to model.max_seq_len).
    yarn: NTK-by-parts interpolation plus an attention temperature (Peng et al.).
    """

    type: Literal["linear", "dynamic", "yarn"]
    factor: float = Field(description="Context extension factor; must be > 1.")
    original_max_position_embeddings: int | None = Field(
        None,
        ge=1,
        description="dynamic/yarn: the pretraining length (default model.max_seq_len). "
        "Not used by linear.",
    )
    beta_fast: float | None = Field(None, gt=0, description="yarn: extrapolation bound (32).")
    beta_slow: float | None = Field(None, gt=0, description="yarn: interpolation bound (1).")
    attention_factor: float | None = Field(
        None, gt=0, description="yarn: cos/sin multiplier; default 0.1 ln(factor) + 1."
    )
    mscale: float | None = Field(None, gt=0, description="yarn: DeepSeek-style mscale.")
    mscale_all_dim: float | None = Field(None, gt=0, description="yarn: with mscale.")
    truncate: bool | None = Field(None, description="yarn: round the ramp bounds (True).")

    @model_validator(mode="after")
    def _check(self) -> RopeScalingConfig:
        if not self.factor > 1:
            raise ValueError(
                f"rope_scaling.factor must be > 1 (got {self.factor}); a factor of 1 is no "
                "scaling: remove rope_scaling instead"
            )
        yarn_only = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")
        set_yarn = [k for k in (*yarn_only, "truncate") if getattr(self, k) is not None]
        if self.type != "yarn" and set_yarn:
            raise ValueError(f"rope_scaling: {', '.join(set_yarn)} only apply to type yarn")
        if self.type == "linear" and self.original_max_position_embeddings is not None:
            raise ValueError(
                "rope_scaling.original_max_position_embeddings is not used by type linear "
                "(positions are divided by factor); remove it"
            )
        return self


class MoEConfig(_Strict):
    """Mixture-of-experts feed-forward layers: every block's MLP becomes routed SwiGLU experts.

    Each token runs through `top_k` of `num_experts` experts (picked by a linear router) plus
    `shared_experts` always-on ones, fused into one SwiGLU of `shared_experts` x
    `expert_intermediate_size` width. Dispatch is dropless: every token reaches its experts.
    """

    num_experts: int = Field(8, ge=1, description="Routed experts per layer.")
    top_k: int = Field(2, ge=1, description="Experts each token is routed to (1..num_experts).")
    expert_intermediate_size: int = Field(128, ge=1, description="SwiGLU width of one expert.")
    shared_experts: int = Field(0, ge=0, description="Always-on experts (DeepSeek style).")
    shared_expert_gate: bool = Field(
        False,
        description="Qwen3-Next style: the shared experts' output is scaled per token by "
        "sigmoid(a learned linear gate of the input). Needs shared_experts >= 1.",
    )
    score: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="Router scores: softmax over experts, or per-expert sigmoid."
    )
    norm_topk_prob: bool = Field(
        True, description="Renormalise the top-k scores of a token to sum to 1."
    )
    routed_scaling: float = Field(1.0, gt=0, description="Factor on the routed experts' sum.")
    aux_loss_coef: float = Field(
        0.01, ge=0, description="Switch-style load-balancing loss per layer; 0 disables it."
    )
    bias_update_rate: float = Field(
        0.0,
        ge=0,
        description="DeepSeek-V3 auxiliary-loss-free balancing: per-expert selection bias moved "
        "by this much (sign of the load error) after every optimizer step; 0 disables it.",
    )
    router_z_loss: float = Field(0.0, ge=0, description="Router z-loss coefficient (ST-MoE).")
    dispatch: Literal["auto", "grouped_mm", "loop"] = Field(
        "auto",
        description="Expert matmuls: torch._grouped_mm, a loop over experts, or auto "
        "(grouped_mm on CUDA, the loop elsewhere).",
    )

    @model_validator(mode="after")
    def _check_top_k(self) -> MoEConfig:
        if self.shared_expert_gate and not self.shared_experts:
            raise ValueError("shared_expert_gate needs shared_experts >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k {self.top_k} exceeds num_experts {self.num_experts}; "
                f"allowed: 1..{self.num_experts}"
            )
        return self


class LinearAttentionConfig(_Strict):
    """Gated DeltaNet token mixers (Qwen3-Next's linear attention) interleaved with attention.

    `pattern` lists layer kinds and repeats over the depth: ["linear", "linear", "linear",
    "full"] (the default, 3 linear : 1 full) makes layers 3, 7, ... full attention. Its length
    must divide model.num_layers. Each linear layer keeps a [key_head_dim x value_head_dim]
    recurrent state per value head instead of a KV cache; see docs/architecture.md.
    """

    pattern: list[Literal["linear", "full"]] = Field(
        default_factory=lambda: ["linear", "linear", "linear", "full"],
        min_length=1,
        description="Layer kinds, repeated over the depth; its length must divide num_layers.",
    )
    num_key_heads: int = Field(2, ge=1, description="Query/key heads of a linear layer.")
    num_value_heads: int = Field(
        4, ge=1, description="Value heads (a multiple of num_key_heads, which they share)."
    )
    key_head_dim: int = Field(32, ge=1)
    value_head_dim: int = Field(32, ge=1)
    conv_kernel: int = Field(4, ge=1, description="Causal depthwise conv width over q, k, v.")
    chunk_size: int = Field(64, ge=1, description="Tokens per chunk of the chunked delta rule.")
    kernels: Literal["auto", "torch", "fla"] = Field(
        "auto",
        description="auto: flash-linear-attention kernels on CUDA when `fla` imports, else the "
        "pure-torch chunked algorithm; torch: always the latter; fla: require fla.",
    )

    @model_validator(mode="after")
    def _check_heads(self) -> LinearAttentionConfig:
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(
                f"num_value_heads {self.num_value_heads} must be a multiple of num_key_heads "
                f"{self.num_key_heads}"
            )
        return self


class ModelConfig(_Strict):
    """A decoder-only Llama/SmolLM3-style transformer."""

    vocab_size: int = Field(8192, ge=2, description="Rows of the embedding table.")
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(
        4, ge=1, description="KV heads: = num_heads is MHA, 1 is MQA, in between GQA."
    )
    head_dim: int | None = Field(None, description="Defaults to hidden_size // num_heads.")
    intermediate_size: int = Field(704, ge=1, description="SwiGLU inner width.")
    max_seq_len: int = Field(256, ge=1, description="Longest sequence the model accepts.")
    rope_theta: float = Field(10000.0, gt=0)
    partial_rotary_factor: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of each head's dims RoPE rotates (the first ones); the rest carry "
        "no position. Qwen3-Next uses 0.25.",
    )
    rope_scaling: RopeScalingConfig | None = Field(
        None, description="RoPE scaling for long context: linear, dynamic (NTK) or yarn."
    )
    nope_interval: int = Field(
        0, ge=0, description="N>0: layer i has no RoPE when (i+1) % N == 0 (SmolLM3 uses 4)."
    )
    nope_layers: list[int] = Field(
        default_factory=list, description="Explicit 0-based layers without RoPE."
    )
    doc_masking: bool = Field(
        False, description="Intra-document attention: packed documents never see each other."
    )
    tie_embeddings: bool = True
    qk_norm: bool = False
    attention_bias: bool = False
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    zero_init_residual: bool = Field(
        False,
        description="Start each block's output projections (attention o_proj / the linear "
        "layer's out_proj, MLP down_proj) at zero, so every block starts as the identity "
        "(modded-nanoGPT's init). Training only: exports are unchanged.",
    )
    z_loss: float = Field(0.0, ge=0, description="Coefficient of the z-loss (logsumexp^2).")
    moe: MoEConfig | None = Field(
        None, description="Mixture-of-experts MLPs (see MoEConfig); null: dense SwiGLU MLPs."
    )
    attn_output_gate: bool = Field(
        False,
        description="Qwen3-Next gated attention: q_proj also yields a per-channel gate, and the "
        "attention output is multiplied by sigmoid(gate) before o_proj.",
    )
    linear_attention: LinearAttentionConfig | None = Field(
        None,
        description="Hybrid model: Gated DeltaNet layers interleaved with full attention by "
        "linear_attention.pattern; null: every layer is full attention.",
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "set head_dim explicitly"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.rope_dim < 2 or self.rope_dim % 2:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} rotates {self.rope_dim} of "
                f"{self.dim_per_head} head dims; it must be an even number >= 2"
            )
        bad = [i for i in self.nope_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"nope_layers {bad} outside 0..{self.num_layers - 1}")
        la = self.linear_attention
        if la is not None and self.num_layers % len(la.pattern):
            raise ValueError(
                f"linear_attention.pattern has {len(la.pattern)} entries, which does not divide "
                f"num_layers {self.num_layers}"
            )
        rs = self.rope_scaling
        if rs is not None and (rs.original_max_position_embeddings or 0) > self.max_seq_len:
            raise ValueError(
                f"rope_scaling.original_max_position_embeddings "
                f"{rs.original_max_position_embeddings} exceeds max_seq_len {self.max_seq_len}"
            )
        return self

    @property
    def rope_original_len(self) -> int:
        """The pretraining length RoPE scaling starts from (max_seq_len without scaling)."""
        rs = self.rope_scaling
        if rs is None or rs.original_max_position_embeddings is None:
            return self.max_seq_len
        return rs.original_max_position_embeddings

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Head dims RoPE rotates (transformers' int(head_dim * partial_rotary_factor))."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    def is_linear(self, layer: int) -> bool:
        """Whether `layer` (0-based) is a Gated DeltaNet layer (else full attention)."""
        la = self.linear_attention
        return la is not None and la.pattern[layer % len(la.pattern)] == "linear"

    @property
    def num_linear_layers(self) -> int:
        return sum(self.is_linear(i) for i in range(self.num_layers))

    def uses_rope(self, layer: int) -> bool:
        """Whether `layer` (0-based) applies rotary embeddings."""
        if layer in self.nope_layers:
            return False
        return not (self.nope_interval and (layer + 1) % self.nope_interval == 0)


class MixtureStage(_Strict):
    """One stage of a data curriculum: source weights for a number of optimizer steps."""

    name: str
    weights: dict[str, float] = Field(description="Source name -> weight (normalised).")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; null: until the end.")


class DataConfig(_Strict):
    """Where training text comes from. The trainer only sees shards and a tokenizer."""

    corpus: Literal["stdlib"] | None = Field(
        "stdlib",
        description="Embedded corpus to build tokenizer and shards from when train_shards is unset.",
    )
    tokenizer: str | None = Field(None, description="tokenizer.json, or None to train one.")
    train_shards: str | None = Field(None, description="Directory or glob of .ds shards.")
    val_shards: str | None = None
    cache_dir: str = Field(".cache/crucible/data", description="Where built data is kept.")
    max_corpus_mb: float = Field(
        12.0, gt=0, description="Cap on embedded-corpus text used to build shards."
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="A mixture: source name -> shard directory or glob (instead of train_shards).",
    )
    stages: list[MixtureStage] = Field(
        default_factory=list, description="Mixture stages in order; only the last may omit steps."
    )

    @model_validator(mode="after")
    def _check_mixture(self) -> DataConfig:
        if bool(self.sources) != bool(self.stages):
            raise ValueError("a mixture needs both data.sources and data.stages")
        if self.sources and self.train_shards is not None:
            raise ValueError("set either data.train_shards or data.sources (a mixture), not both")
        unknown = {n for st in self.stages for n in st.weights} - set(self.sources)
        if unknown:
            raise ValueError(f"data.stages weight unknown sources {sorted(unknown)}")
        if any(st.steps is None for st in self.stages[:-1]):
            raise ValueError("only the last of data.stages may leave steps unset")
        return self


class MuonConfig(_Strict):
    """Muon (torch.optim.Muon) for the 2-D hidden matrices when optim.name is muon."""

    lr: float | None = Field(
        None,
        gt=0,
        description="Peak Muon LR; null: optim.lr (right with adjust_lr match_rms_adamw). "
        "The schedule scales it like optim.lr.",
    )
    momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = Field(5, ge=1, le=99, description="Newton-Schulz iterations.")
    adjust_lr: Literal["match_rms_adamw", "original"] = Field(
        "match_rms_adamw",
        description="match_rms_adamw: Moonlight's 0.2*sqrt(max(A,B)) (reuse AdamW LR and weight "
        "decay); original: Keller Jordan's sqrt(max(1, A/B)) (needs a Muon LR, ~0.02).",
    )
    weight_decay: float | None = Field(None, ge=0, description="null: optim.weight_decay.")


class OptimConfig(_Strict):
    name: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for hidden matrices, AdamW for the rest."
    )
    muon: MuonConfig = Field(default_factory=MuonConfig)
    lr: float = Field(3e-3, gt=0)
    betas: tuple[float, float] = Field(
        (0.9, 0.95), description="Adam's beta1, beta2; each in [0, 1)."
    )
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    decay_embeddings: bool = Field(True, description="Apply weight decay to embeddings.")
    clip_grad: float | None = Field(
        1.0, gt=0, description="Max global grad norm (> 0); null disables clipping."
    )
    fused: bool | None = Field(None, description="Fused AdamW; default: on for CUDA.")

    @model_validator(mode="after")
    def _check_betas(self) -> OptimConfig:
        bad = [b for b in self.betas if not 0 <= b < 1]
        if bad:
            raise ValueError(f"optim.betas {list(self.betas)}: each must be in [0, 1)")
        return self

    @model_validator(mode="after")
    def _check_muon(self) -> OptimConfig:
        if self.name == "muon" and self.muon.adjust_lr == "original" and self.muon.lr is None:
            raise ValueError(
                "muon.lr is required with muon.adjust_lr=original (Keller Jordan's scaling "
                "expects a Muon LR around 0.02, not the AdamW LR)"
            )
        return self


class ScheduleConfig(_Strict):
    kind: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr: float = Field(0.0, ge=0, description="LR at the end of decay (absolute).")
    decay_fraction: float = Field(
        0.1, gt=0, le=1, description="WSD: share of total steps spent decaying at the end."
    )
    decay_shape: Literal["linear", "cosine", "sqrt"] = Field("linear", description="WSD decay.")


class TrainConfig(_Strict):
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    seq_len: int = Field(256, ge=2)
    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward pass per rank.")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where supported (CUDA, CPUs with bf16)."
    )
    compile: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    log_every: int = Field(10, ge=1)
    val_every: int = Field(100, ge=0, description="0 disables periodic validation.")
    val_batches: int = Field(8, ge=1, description="Micro-batches per validation.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's.")
    stop_at: int | None = Field(
        None,
        ge=1,
        description="Stop after this step (saving a checkpoint there, no summary.json); the LR "
        "schedule is still that of `steps`. Used for the shared trunk of forked ablations.",
    )
    wandb_project: str | None = None
    tensorboard: bool = True
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none",
        description="Recompute activations in backward: full re-runs whole blocks (keeps only "
        "each block's input); selective recomputes the SwiGLU tail (silu, product, down "
        "projection) from the kept gate and up outputs.",
    )
    activation_checkpointing_every: int = Field(
        1, ge=1, description="Checkpoint every N-th block (blocks 0, N, 2N, ...); 1: all."
    )
    prefetch: bool = Field(
        True,
        description="Build the next step's batches in a background thread while this step "
        "computes (pinned memory on CUDA); the wait is logged as data_seconds.",
    )
    fp8: Literal["none", "tensorwise", "rowwise"] = Field(
        "none", description="FP8 matmuls through torchao float8 (CUDA, compute capability 8.9+)."
    )

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


class CheckpointConfig(_Strict):
    every: int = Field(100, ge=0, description="Save every N steps; 0 saves only at the end.")
    keep_last: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    milestone_every: int = Field(
        0,
        ge=0,
        description="Also keep every checkpoint whose step is a multiple of N (a milestone), "
        "beyond keep_last; 0: none. A multiple of checkpoint.every.",
    )
    async_save: bool = Field(
        False,
        description="Several processes: write the sharded checkpoint in the background "
        "(torch.distributed.checkpoint.async_save); one process always saves synchronously.",
    )
    init_from: str | None = Field(
        None,
        description="A complete checkpoint directory (.../checkpoints/step_N) to start from: "
        "model, optimizer and RNG state, at step N, with this run's data and schedule. Ignored "
        "once the run has checkpoints of its own (--resume continues those).",
    )

    @model_validator(mode="after")
    def _check_milestones(self) -> CheckpointConfig:
        if self.milestone_every and not self.every:
            raise ValueError(
                "checkpoint.milestone_every needs checkpoint.every > 0 (milestones are kept "
                "periodic checkpoints)"
            )
        if self.milestone_every and self.milestone_every % self.every:
            raise ValueError(
                f"checkpoint.milestone_every {self.milestone_every} must be a multiple of "
                f"checkpoint.every {self.every}"
            )
        return self


class SpikeConfig(_Strict):
    """Loss / grad-norm spike handling (see docs/training.md, "Surviving the marathon").

    The detector flags a step whose loss or grad norm exceeds mean + sigma x std of the last
    `window` accepted steps (OLMo-core's skip-step rule: 6 sigma over 128 steps), once it has
    `min_history` of them. Non-finite loss or grad norm is always caught, whatever the policy.
    """

    policy: Literal["none", "skip", "rollback", "lr_cooldown"] = Field(
        "skip",
        description="skip: do not apply the step's update; rollback: reload the last good "
        "checkpoint and skip `rollback_skip_batches` steps of data (PaLM-style); lr_cooldown: "
        "skip the step and scale the LR by `cooldown_factor` for `cooldown_steps`; none: detect "
        "nothing (non-finite steps are still skipped).",
    )
    window: int = Field(128, ge=4, description="Accepted steps the statistics are taken over.")
    sigma: float = Field(6.0, gt=0, description="Threshold in standard deviations above the mean.")
    min_history: int = Field(
        64, ge=2, description="Accepted steps needed before spikes are judged at all."
    )
    watch: list[Literal["loss", "grad_norm"]] = Field(
        default_factory=lambda: ["loss", "grad_norm"], description="Signals the detector watches."
    )
    loss_min_ratio: float = Field(
        1.2, ge=1, description="A loss spike must also exceed this multiple of the window mean."
    )
    grad_norm_min_ratio: float = Field(
        3.0,
        ge=1,
        description="A grad-norm spike must also exceed this multiple of the window mean: at small "
        "batches grad norms are heavy-tailed, and 6 sigma alone flags noise.",
    )
    escalate_after: int = Field(
        8,
        ge=1,
        description="Consecutive skipped steps (spikes or non-finite) after which the run rolls "
        "back to its last good checkpoint (or stops when there is none).",
    )
    rollback_skip_batches: int = Field(
        0, ge=0, description="Steps of data skipped after a rollback (PaLM skipped 200-500)."
    )
    max_rollbacks: int = Field(
        5, ge=0, description="Rollbacks allowed in one invocation before the run stops."
    )
    cooldown_steps: int = Field(50, ge=1, description="lr_cooldown: steps at the lower LR.")
    cooldown_factor: float = Field(
        0.1, gt=0, lt=1, description="lr_cooldown: LR multiplier during the window."
    )


class MonitorConfig(_Strict):
    """Monitoring beyond loss: cheap scalars at every log step, details every `every` steps."""

    enabled: bool = Field(True, description="false: no monitoring callback at all.")

    every: int = Field(
        100,
        ge=0,
        description="Steps between detailed snapshots (per-layer grad/param/update RMS, "
        "activation RMS, max attention logit, loss per source); 0 disables them.",
    )
    alerts: bool = Field(True, description="Raise alerts (throughput drop, grad-norm, z growth).")
    throughput_drop: float = Field(
        0.5, gt=0, lt=1, description="Alert when tokens/s falls below this share of its median."
    )
    growth_factor: float = Field(
        4.0, gt=1, description="Alert when grad norm or z grows by this factor over the window."
    )


class FaultConfig(_Strict):
    """A fault injected on purpose (chaos testing and the incident-report example)."""

    step: int = Field(ge=1, description="Optimizer step (1-based) the fault hits.")
    kind: Literal["nan_loss", "lr_spike", "poison_batch", "crash"]
    factor: float = Field(100.0, gt=0, description="lr_spike: LR multiplier for that step.")
    rank: int | None = Field(None, ge=0, description="crash: only this rank (default: all).")


class DistributedConfig(_Strict):
    """Data parallelism (DDP or FSDP2) and tensor parallelism on a (dp, tp) device mesh."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    tp: int = Field(1, ge=1, description="Tensor-parallel degree (ranks per TP group).")
    dp: int | None = Field(
        None, ge=1, description="Data-parallel degree; null: world size / tp. dp x tp = world."
    )
    sequence_parallel: bool = Field(
        False, description="With tp > 1: split norms and residuals along the sequence too."
    )
    fsdp_param_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="dtype FSDP2 gathers parameters in (MixedPrecisionPolicy.param_dtype); "
        "auto: bf16 when train.dtype resolves to bf16, else fp32.",
    )
    fsdp_reduce_dtype: Literal["bf16", "fp32"] = Field(
        "fp32", description="dtype FSDP2 reduce-scatters gradients in."
    )
    fsdp_reshard_after_forward: bool = Field(
        True,
        description="Free gathered parameters after each block's forward (ZeRO-3); false keeps "
        "them until backward (ZeRO-2-like: more memory, no second all-gather).",
    )
    fsdp_prefetch: int = Field(
        1, ge=0, description="Blocks whose all-gather is issued ahead (forward and backward)."
    )
    timeout_minutes: float = Field(
        30.0, gt=0, description="Collective timeout: how long ranks wait for a lost peer."
    )


class EvalConfig(_Strict):
    """In-loop evaluation on a fixed subset of tasks (see docs/evaluation.md); off by default."""

    every: int = Field(0, ge=0, description="Evaluate every N optimizer steps; 0 disables.")
    every_tokens: int | None = Field(
        None, ge=1, description="Or every N training tokens (rounded up to whole steps)."
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["early"], description="Task names or groups (early, builtin)."
    )
    subset: int | None = Field(64, ge=1, description="Documents per task; null: all of them.")
    batch_size: int = Field(32, ge=1)
    seed: int = Field(0, description="Seed of the task subsets and few-shot examples.")
    data_dir: str | None = Field(None, description="Where benchmark files (<task>.jsonl) live.")
    at_end: bool = Field(True, description="Also evaluate after the last step.")
    allow_unsafe_code: bool = Field(
        False,
        description="Run generated code (HumanEval) without isolation where the namespace "
        "sandbox is unavailable (docs/evaluation.md, Code execution sandbox).",
    )


class _PosttrainBase(_Strict):
    """What every post-training command shares: the model it starts from."""

    init_from: str | None = Field(
        None,
        description="The model to start from: a Crucible run directory (its latest checkpoint), "
        "a checkpoint directory (.../checkpoints/step_N) or a Hugging Face directory "
        "(config.json + safetensors + tokenizer.json). The run's model config and tokenizer "
        "are taken from it.",
    )
    template: str | None = Field(None, description="A Jinja chat template; default: built-in.")


class DPOConfig(_PosttrainBase):
    """`crucible dpo`: preference optimisation on chosen/rejected pairs (docs/post-training.md)."""

    data: list[str] = Field(
        default_factory=list,
        description="JSONL files of {prompt, chosen, rejected} records (strings or message "
        "lists), or {chosen, rejected} whole conversations.",
    )
    loss_type: Literal["sigmoid", "ipo", "apo_zero", "apo_down"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid only (cDPO).")
    reference: Literal["cached", "on_the_fly"] = Field(
        "cached",
        description="cached: reference log-probs computed once before training and stored in "
        "the run directory (reference_logps.safetensors); on_the_fly: a frozen copy of the "
        "starting model scores every batch.",
    )
    max_pairs: int | None = Field(None, ge=1, description="Use at most this many pairs.")


class GRPOConfig(_PosttrainBase):
    """`crucible grpo`: RL with verifiable rewards, the GRPO family (docs/post-training.md)."""

    prompts: str | None = Field(
        None,
        description="Where prompts come from: 'synthetic:arithmetic' (the chat generator's "
        "verifiable arithmetic, train split) or a JSONL file of {prompt, answer, ...} records "
        "(prompt: a string or a message list; other columns go to the verifiers).",
    )
    num_prompts: int = Field(512, ge=1, description="synthetic: how many prompts to draw.")
    group_size: int = Field(4, ge=2, description="Completions per prompt (G).")
    max_completion_length: int = Field(48, ge=1, description="New tokens per completion.")
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["none", "group", "batch"] = "group"
    epsilon: float = Field(0.2, ge=0, lt=1)
    epsilon_high: float | None = Field(None, ge=0, description="DAPO clip-higher; default epsilon.")
    beta: float = Field(0.0, ge=0, description="Weight of the k3 KL term against the reference.")
    mask_truncated: bool = Field(
        True, description="Leave completions that hit max_completion_length out of the loss."
    )
    verifiers: list[str] = Field(
        default_factory=lambda: ["last_number"],
        description="Reward functions: last_number, boxed, exact, regex, format, code.",
    )
    reward_weights: list[float] | None = None
    overlong_penalty: bool = Field(False, description="Add DAPO's soft overlong penalty.")
    overlong_cache: int = Field(
        16, ge=0, description="Soft-penalty band: the last N tokens before max_completion_length."
    )
    enable_thinking: bool = Field(False, description="Render prompts in think mode.")
    system_prompt: str | None = Field(
        None, description="A system message put before every prompt that has none."
    )

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.verifiers):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for "
                f"{len(self.verifiers)} verifiers"
            )
        if self.overlong_penalty and self.overlong_cache > self.max_completion_length:
            raise ValueError(
                f"overlong_cache {self.overlong_cache} exceeds max_completion_length "
                f"{self.max_completion_length}"
            )
        return self


class DistillConfig(_PosttrainBase):
    """`crucible distill`: on-policy distillation (GKD) from a teacher of the same tokenizer."""

    teacher: str | None = Field(
        None, description="Teacher: a Crucible run or checkpoint directory, or an HF directory."
    )
    data: list[str] = Field(
        default_factory=list, description="Chat conversations (JSONL, `messages` format)."
    )
    beta: float = Field(0.5, ge=0, le=1, description="0: forward KL, 1: reverse KL, else JSD.")
    lmbda: float = Field(0.5, ge=0, le=1, description="Share of student-generated batches.")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, ge=1, description="Student completion length (on-policy).")


class SFTConfig(_Strict):
    """Supervised fine-tuning on conversations (`crucible sft`, docs/post-training.md, SFT)."""

    base: str | None = Field(
        None,
        description="The model to fine-tune: a run directory (its latest checkpoint), a "
        "checkpoint directory (.../checkpoints/step_N), or a Hugging Face directory "
        "(config.json + safetensors + tokenizer.json). Null: a fresh model (needs data.tokenizer).",
    )
    train_data: list[str] = Field(
        default_factory=list,
        description="Conversation files (JSONL `messages` format) or local HF dataset "
        "directories; empty: the built-in synthetic chat data (`crucible chat-data`).",
    )
    val_data: list[str] = Field(
        default_factory=list,
        description="Held-out conversations for the validation loss; empty: the synthetic test "
        "split when train_data is empty, else no validation.",
    )
    split: str = Field("train", description="Split of HF dataset directories.")
    synthetic_train: int = Field(
        4000, ge=1, description="Synthetic training conversations when train_data is empty."
    )
    synthetic_val: int = Field(
        200, ge=1, description="Synthetic held-out conversations when val_data is empty."
    )
    synthetic_seed: int = 0
    synthetic_tasks: dict[str, float] | None = Field(
        None, description="Synthetic task weights (default: the generator's mixture)."
    )
    loss: Literal["assistant", "completion"] = Field(
        "assistant",
        description="assistant: loss on every assistant turn (the {% generation %} spans); "
        "completion: only on the last assistant turn.",
    )
    packing: Literal["bfd", "none"] = Field(
        "bfd",
        description="bfd: best-fit-decreasing packing into rows of train.seq_len with document "
        "masking (needs model.doc_masking=true); none: one conversation per row, padded.",
    )
    truncation: Literal["drop", "keep_start", "error"] = Field(
        "drop",
        description="A conversation longer than train.seq_len + 1 tokens is dropped, cut "
        "(keep_start) or an error; each case is counted and reported.",
    )
    template: str | None = Field(
        None, description="A Jinja chat template file; null: the built-in hybrid template."
    )
    template_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"today_date": "01 January 2026"},
        description="Template variables under each record's own chat_template_kwargs. Pin "
        "today_date: otherwise records render the current date and a resume on another day "
        "would see other tokens.",
    )


class RunConfig(_Strict):
    name: str = "run"
    out_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    spikes: SpikeConfig = Field(default_factory=SpikeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    faults: list[FaultConfig] = Field(
        default_factory=list, description="Faults injected on purpose (testing the guards)."
    )
    dpo: DPOConfig | None = Field(None, description="Preference optimisation (crucible dpo).")
    grpo: GRPOConfig | None = Field(None, description="RL with verifiable rewards (crucible grpo).")
    distill: DistillConfig | None = Field(None, description="On-policy distillation.")
    sft: SFTConfig | None = Field(
        None, description="Supervised fine-tuning on conversations (`crucible sft`)."
    )

    @model_validator(mode="after")
    def _check_run(self) -> RunConfig:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len {self.train.seq_len} exceeds model.max_seq_len "
                f"{self.model.max_seq_len}"
            )
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size {self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size {self.train.micro_batch_size}"
            )
        if self.train.stop_at is not None and self.train.stop_at > self.train.steps:
            raise ValueError(
                f"train.stop_at {self.train.stop_at} is after train.steps {self.train.steps}"
            )
        late = [f.step for f in self.faults if f.step > self.train.steps]
        if late:
            raise ValueError(f"faults at steps {late} are after train.steps {self.train.steps}")
        if self.spikes.min_history > self.spikes.window:
            raise ValueError(
                f"spikes.min_history {self.spikes.min_history} exceeds spikes.window "
                f"{self.spikes.window}"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# --------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("crucible.presets").iterdir()
        if p.name.endswith(".yaml")
    )


def _read_yaml(source: str | Path, _seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """Read a config file or preset name; return (mapping, label used in error messages).

    `_seen` holds the files already on the `base:` chain, so a cycle is an error, not a recursion.
    """
    path = Path(source)
    if not path.exists() and not str(source).endswith((".yaml", ".yml")):
        if str(source) in preset_names():
            text = resources.files("crucible.presets").joinpath(f"{source}.yaml").read_text()
            label = f"preset '{source}'"
        else:
            raise ConfigError(
                f"{source}: no such config file or preset (presets: {', '.join(preset_names())})"
            )
    else:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text, label = path.read_text(), str(path)
    if not text.strip():
        raise ConfigError(
            f"{label}: the config file is empty; write at least `base: PRESET` "
            f"(presets: {', '.join(preset_names())})"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{label}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise ConfigError(f"{label}: the config file holds only comments; write `base: PRESET`")
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        # `base: tiny` inherits a preset (or another file) and overrides it.
        if not isinstance(base, str):
            raise ConfigError(f"{label}: base: {base!r} must be a preset name or a file path")
        me = str(path.resolve()) if path.is_file() else label
        target = base if Path(base).is_absolute() else _resolve_base(base, path)
        if Path(target).is_file() and str(Path(target).resolve()) in (*_seen, me):
            raise ConfigError(f"{label}: base: {base} makes a cycle (a file inherits itself)")
        parent, _ = _read_yaml(target, (*_seen, me))
        data = _deep_merge(parent, data)
    return data, label


def _resolve_base(base: str, child: Path) -> str:
    candidate = child.parent / base
    return str(candidate) if candidate.exists() else base


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _known_fields(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        # `X | None` sections (model.moe, dpo, ...): look inside the union for the model class.
        ann = next((a for a in get_args(ann) if isinstance(a, type)), ann) if get_args(ann) else ann
        # `X | None` sections: their model
        ann = next((a for a in get_args(ann) if isinstance(a, type)), ann) if ann else ann
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{p}' is not a section")
    node[parts[-1]] = value


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaf_paths(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _close_anywhere(key: str) -> list[str]:
    """Dotted paths in other sections whose last part is `key` or close to it (lr -> optim.lr)."""
    paths = _leaf_paths(RunConfig)
    exact = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if exact:
        return exact
    leaves = {p.rsplit(".", 1)[-1]: p for p in paths}
    return [leaves[c] for c in difflib.get_close_matches(key, list(leaves), n=1)]


def config_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are legal but probably not meant; the commands print them as one line each."""
    # The schedule's arithmetic (min_lr above lr, warmup longer than the run) is checked by the
    # trainer's preflight (crucible/train/preflight.py), which refuses or warns before step 1.
    out = []
    d = cfg.data
    same = d.train_shards is not None and d.val_shards is not None
    if same and Path(d.train_shards).resolve() == Path(d.val_shards).resolve():
        out.append(
            f"data.val_shards is data.train_shards ({d.train_shards}): validation loss will "
            "measure memorisation, not generalisation"
        )
    return out


def format_validation_error(err: ValidationError, label: str) -> str:
    lines = [f"{label}: invalid configuration"]
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        path = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _known_fields(RunConfig, loc[:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1) or _close_anywhere(loc[-1])
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(
                f"  {path}: unknown key.{hint} Allowed: {', '.join(allowed)}"
                if allowed
                else f"  {path}: unknown key"
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from a YAML file or preset name plus dotted overrides."""
    data, label = _read_yaml(source) if source is not None else ({}, "defaults")
    for o in overrides or []:
        apply_override(data, o)
    if overrides:
        label += f" (with overrides {' '.join(overrides)})"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, label)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
