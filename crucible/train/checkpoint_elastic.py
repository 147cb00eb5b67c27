"""Loading a checkpoint into another layout: N processes to M, DDP, FSDP2 or one process.

A sharded checkpoint (`dcp/`) goes through DCP, which reshards to whatever the current model
and optimizer are (one process reads every shard). A single-process checkpoint is read from its
safetensors on rank 0 and broadcast by `set_*_state_dict(broadcast_from_rank0=True)`, every rank
keeping its FSDP2 shard or DDP replica. Nothing here unpickles: `dcp/` is read through the
restricted reader of checkpoint_dcp.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from crucible.train.checkpoint_state import unflatten_optimizer


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def rng_file(ckpt: Path, saved_world: int, world: int, rank: int) -> Path:
    """The RNG state a rank restores: its own on the same world size, else rank 0's.

    After an elastic resume every rank continues rank 0's streams. That matches a fresh start,
    where every rank seeds the same generators; the loop draws no per-rank random numbers.
    """
    if saved_world == world:
        return ckpt / ("rng.safetensors" if world == 1 else f"rng_rank{rank}.safetensors")
    return ckpt / ("rng.safetensors" if saved_world == 1 else "rng_rank0.safetensors")


def read_optimizer(ckpt: Path) -> dict[str, Any]:
    """The optimizer state of a single-process checkpoint, keyed by parameter index."""
    plain = json.loads((ckpt / "optimizer.json").read_text())
    return unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")), plain)


def load_sharded(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """DCP shards into the current layout: the same or another world size, or one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    from crucible.train.checkpoint_dcp import SafeLoadPlanner, SafeReader

    def load(sd: dict[str, Any]) -> None:
        reader, planner = SafeReader(str(ckpt / "dcp")), SafeLoadPlanner()
        with warnings.catch_warnings():  # one process reading every shard is what we mean
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(sd, storage_reader=reader, planner=planner, no_dist=not _is_dist())

    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
        load(sd)
        set_model_state_dict(model, sd["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    load(sd)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in the unwrapped model (what state dicts are keyed by)."""
    base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {id(p): n for n, p in base.named_parameters()}


def load_full_broadcast(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    """A single-process checkpoint into several processes: rank 0 reads the full state and
    `set_state_dict` broadcasts it, each rank keeping its shard (FSDP2) or a replica (DDP)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    if _rank() == 0:
        model_sd = load_file(str(ckpt / "model.safetensors"))
        if optimizer is not None:
            optim_sd = _optimizer_by_name(read_optimizer(ckpt), model, optimizer)
    # Separately: set_state_dict takes the other ranks' empty model dict for "optimizer only".
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def _optimizer_by_name(
    sd: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """optimizer.state_dict() form (parameters by index) -> the full form keyed by parameter
    name that `set_state_dict` takes. Index i is the i-th parameter of the optimizer's groups,
    in every layout (the optimizer is built the same way on the unwrapped, DDP and FSDP2 model)."""
    names = _param_names(model)
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = sd["param_groups"]
    if sum(len(g["params"]) for g in groups) != len(order):
        raise ValueError("optimizer state does not match the model's parameters")
    return {
        "state": {order[int(i)]: st for i, st in sd["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in groups],
    }
