"""Building the model for a layout: tensor parallelism, activation checkpointing, compile, FSDP2
or DDP, then weights, on torch.distributed's own pieces (DTensor, FSDP2, DDP).

Order (as torchtitan does): build on the meta device, apply TP (`parallelize_module`), activation
checkpointing, per-block compile, FSDP2 (`fully_shard`), then allocate (`to_empty`) and initialise.
Under DDP the model is compiled *after* wrapping, so dynamo's DDP optimizer splits the graph at
bucket boundaries and each bucket's all-reduce overlaps the rest of backward.

Initialisation is the same as one process with the same seed, whatever the sharding: a random
fill of a sharded parameter draws the full tensor from the (identically seeded) generator on
every rank, in the single-process order, and keeps this rank's shard (`single_process_init`).
Drawing only the local shard from the shared seed would give every TP rank the same numbers:
repeated weight blocks, the SmolLM3 TP initialisation bug.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from crucible.config import RunConfig
from crucible.model import Transformer
from crucible.train.activation_checkpointing import apply_activation_checkpointing
from crucible.train.distributed import DistInfo
from crucible.train.setup import compile_model

# nn.init's functions hand DTensors to torch-function modes whole; the tensor methods are the
# fills underneath for direct calls.
_RANDOM_FILLS = {
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    nn.init.normal_,
    nn.init.uniform_,
    nn.init.trunc_normal_,
    nn.init.kaiming_uniform_,
    nn.init.kaiming_normal_,
    nn.init.xavier_uniform_,
    nn.init.xavier_normal_,
}


class _FullDrawThenShard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        from torch.distributed.tensor import DTensor, distribute_tensor

        if func in _RANDOM_FILLS:
            # nn.init passes the tensor by keyword; the methods positionally.
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, DTensor):
                if args:
                    args = args[1:]
                else:
                    kwargs.pop("tensor")
                full = torch.empty(
                    target.shape, dtype=target.dtype, device=target.to_local().device
                )
                func(full, *args, **kwargs)
                # src_data_rank=None: every rank slices its own (identical) full tensor.
                shard = distribute_tensor(
                    full, target.device_mesh, target.placements, src_data_rank=None
                )
                target.copy_(shard)
                return target
        return func(*args, **kwargs)


@contextmanager
def single_process_init():
    """Random fills of DTensor parameters give this rank its shard of the one-process draw."""
    with _FullDrawThenShard():
        yield


def apply_tp(model: Transformer, tp_mesh, sequence_parallel: bool = False) -> None:
    """Megatron-style TP per block: q/k/v and gate/up column-wise, o and down row-wise.

    Each rank keeps num_heads / tp query heads and num_kv_heads / tp KV heads, so attention runs
    on local heads without communication; the row-wise projections all-reduce (or, with sequence
    parallelism, reduce-scatter along the sequence) their outputs. The embedding, the norms and
    the output head stay whole on every TP rank (FSDP shards them over the data-parallel ranks).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    for block in model.layers:
        plan: dict = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        if sequence_parallel:
            seq = Shard(1)
            plan.update(
                {
                    "input_layernorm": SequenceParallel(),
                    "post_attention_layernorm": SequenceParallel(),
                    "self_attn": PrepareModuleInput(
                        input_layouts=(seq, None, None, None, None),
                        desired_input_layouts=(Replicate(), None, None, None, None),
                    ),
                    "mlp": PrepareModuleInput(
                        input_layouts=(seq,), desired_input_layouts=(Replicate(),)
                    ),
                    "self_attn.q_proj": ColwiseParallel(),
                    "self_attn.o_proj": RowwiseParallel(output_layouts=seq, use_local_output=False),
                    "mlp.down_proj": RowwiseParallel(output_layouts=seq, use_local_output=False),
                }
            )
        parallelize_module(block, tp_mesh, plan)
        block.self_attn.num_heads //= tp
        block.self_attn.num_kv_heads //= tp
    if sequence_parallel:
        _sequence_parallel_ends(model, tp_mesh)


def _sequence_parallel_ends(model: Transformer, tp_mesh) -> None:
    """Split the residual stream along the sequence after the embedding; gather it before the
    final norm (the fused loss needs whole sequences)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def split(_module, _args, out):
        return DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False).redistribute(
            tp_mesh, [Shard(1)]
        )

    def gather(_module, args):
        (x,) = args
        return (x.redistribute(tp_mesh, [Replicate()]).to_local(),)

    model.embed.register_forward_hook(split)
    model.norm.register_forward_pre_hook(gather)


def fsdp_mp_policy(cfg: RunConfig, amp: torch.dtype | None):
    """FSDP2's MixedPrecisionPolicy: gather in bf16 (auto: when autocast is bf16), reduce in the
    configured dtype (fp32 by default). fp32 everywhere means no policy (no casts at all)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    d = cfg.distributed
    param = d.fsdp_param_dtype
    if param == "auto":
        param = "bf16" if amp == torch.bfloat16 else "fp32"
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if param == "fp32" and d.fsdp_reduce_dtype == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtypes[param], reduce_dtype=dtypes[d.fsdp_reduce_dtype])


def apply_fsdp(model: Transformer, dp_mesh, cfg: RunConfig, amp: torch.dtype | None) -> None:
    """Shard each block, then the root (embedding, final norm, head); explicit prefetch of the
    next `fsdp_prefetch` blocks' all-gathers in forward and in backward."""
    from torch.distributed.fsdp import fully_shard

    d = cfg.distributed
    kw = dict(mesh=dp_mesh, mp_policy=fsdp_mp_policy(cfg, amp))
    blocks = list(model.layers)
    for block in blocks:
        fully_shard(block, reshard_after_forward=d.fsdp_reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=d.fsdp_reshard_after_forward, **kw)
    n = d.fsdp_prefetch
    if n > 0:
        for i, block in enumerate(blocks):
            ahead = blocks[i + 1 : i + 1 + n]
            behind = blocks[max(0, i - n) : i][::-1]
            if ahead:
                block.set_modules_to_forward_prefetch(ahead)
            if behind:
                block.set_modules_to_backward_prefetch(behind)


def apply_fp8(model: Transformer, recipe: str) -> None:
    """torchao float8 training for the block linears (the output head stays bf16)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(
        model, config=config, module_filter_fn=lambda mod, fqn: fqn.startswith("layers.")
    )


def build_model(
    cfg: RunConfig, info: DistInfo, device: torch.device, amp: torch.dtype | None
) -> nn.Module:
    """The model the trainer steps, for this process's place in the (dp, tp) mesh."""
    d, train = cfg.distributed, cfg.train
    torch.manual_seed(cfg.seed)
    if not info.enabled:
        with torch.device(device):  # initialise in place: no full-size CPU copy
            model = Transformer(cfg.model)
        if train.fp8 != "none":
            apply_fp8(model, train.fp8)
        apply_activation_checkpointing(model, train.activation_checkpointing,
                                       train.activation_checkpointing_every)  # fmt: skip
        if train.compile:
            compile_model(model)
        return model

    with torch.device("meta"):
        model = Transformer(cfg.model)
    if train.fp8 != "none":
        apply_fp8(model, train.fp8)
    if info.tp > 1:
        apply_tp(model, info.mesh["tp"], d.sequence_parallel)
    apply_activation_checkpointing(model, train.activation_checkpointing,
                                   train.activation_checkpointing_every)  # fmt: skip
    fsdp = d.strategy == "fsdp"
    if train.compile and (fsdp or info.tp > 1):
        compile_model(model, per_block=True)
    if fsdp:
        apply_fsdp(model, info.mesh["dp"], cfg, amp)
    model.to_empty(device=device)
    torch.manual_seed(cfg.seed)
    with torch.no_grad(), single_process_init():
        model.init_weights()
    if not fsdp and info.dp_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
        if train.compile:
            model.compile()  # after wrapping: gradient buckets overlap backward
    elif train.compile and not fsdp and info.tp == 1:
        model.compile()
    return model


def load_initial_weights(
    model: nn.Module, cfg: RunConfig, info: DistInfo, fill: Callable[[nn.Module], None]
) -> None:
    """Start the built model from other weights (a base model): `fill` loads them into a plain
    Transformer. One process fills the model itself; distributed layouts get the full state
    dict placed into their shards and replicas."""
    if not info.enabled:
        fill(model)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("cpu"):
        full = Transformer(cfg.model)
    fill(full)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, full.state_dict(), options=options)
