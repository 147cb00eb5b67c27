"""Checkpoints: complete and verified or absent, never partial, loadable without unpickling.

Layout of `checkpoints/step_000123/` (format 2):

- `state.json`: step, tokens seen, data-loader position, world size and strategy, format version.
- `model.safetensors`: the full model weights, in every layout (what generate, export, eval,
  report and doctor read; they never read anything else).
- one process: `optimizer.safetensors` + `optimizer.json` (the tensors and the plain values of
  `optimizer.state_dict()`), `rng.safetensors` (torch CPU/CUDA, numpy and python generators).
- several processes: also `dcp/`, a sharded `torch.distributed.checkpoint` of model and
  optimizer (read by --resume and init_from only, without arbitrary unpickling:
  checkpoint_dcp), and one
  `rng_rank{r}.safetensors` per rank.

Resuming is elastic: either layout loads on any world size and strategy (`load_checkpoint`).
- `manifest.json`, written last: size and SHA-256 of every other file (checkpoint_manifest).

A save writes `step_000123.tmp/`, fsyncs every file and directory, writes the manifest and renames
the directory into place (then fsyncs the parent), so a crash never leaves a `step_N/` that is
not complete. A checkpoint whose weights or optimizer state hold a NaN or an Inf is refused
(`NonFiniteCheckpointError`). Loading verifies the manifest and falls back to the newest intact
checkpoint (checkpoint_store). With `async_save` (several processes), the DCP shards are written
in the background; the manifest and the rename happen in `finalize_pending()`, which the next save
and the end of training call.
"""

from __future__ import annotations

import errno
import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from crucible.config import ConfigError
from crucible.train import chaos
from crucible.train.checkpoint_elastic import (
    load_full_broadcast,
    load_sharded,
    read_optimizer,
    rng_file,
)
from crucible.train.checkpoint_manifest import (
    Verify,
    Warn,
    checkpoint_files,
    describe_files,
    fsync_dirs,
    fsync_path,
    is_legacy,
    read_parts,
    verify_checkpoint,
    write_manifest,
    write_part,
)
from crucible.train.checkpoint_state import (
    flatten_optimizer,
    rng_tensors,
    set_rng,
)
from crucible.train.checkpoint_store import (
    CheckpointWarning,
    clean_checkpoints,
    default_warn,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    step_dir,
)

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "NonFiniteCheckpointError",
    "Verify",
    "check_init_from",
    "clean_checkpoints",
    "finalize_pending",
    "find_resume_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "read_state",
    "save_checkpoint",
    "step_dir",
    "verify_checkpoint",
]

FORMAT_VERSION = 2


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, incomplete, damaged or of another layout."""


class NonFiniteCheckpointError(RuntimeError):
    """The model or optimizer state holds a NaN or an Inf: the checkpoint was not written."""

    def __init__(self, step: int, tensor: str) -> None:
        self.step, self.tensor = step, tensor
        super().__init__(
            f"checkpoint step {step} not written: {tensor} holds non-finite values (NaN or Inf); "
            "the earlier checkpoints are kept"
        )


# --------------------------------------------------------------------------- save / load


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _nested_tensors(prefix: str, obj: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _nested_tensors(f"{prefix}.{k}", v)]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _nested_tensors(f"{prefix}.{i}", v)]
    return []


def check_finite(step: int, named: list[tuple[str, torch.Tensor]]) -> None:
    """Raise NonFiniteCheckpointError naming the first tensor with a NaN or an Inf.

    One device sync for all tensors; collective under torchrun (every rank raises together).
    """
    floats = [(n, t) for n, t in named if t.is_floating_point() or t.is_complex()]
    first = len(floats)
    if floats:
        local = [t.to_local() if hasattr(t, "to_local") else t for _, t in floats]
        dev = local[0].device
        ok = torch.stack([torch.isfinite(t).all().to(dev) for t in local])
        bad = (~ok).nonzero()
        first = int(bad[0, 0]) if bad.numel() else len(floats)
    if _is_dist():
        t = torch.tensor([first], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        first = int(t.item())
    if first < len(floats):
        raise NonFiniteCheckpointError(step, floats[first][0])


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Index in optimizer.state_dict()['state'] -> parameter name (for readable errors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: names.get(id(p), str(i)) for i, p in enumerate(order)}


@dataclass
class _Pending:
    """An async save whose shards are still being written."""

    checkpoints: Path
    step: int
    tmp: Path
    final: Path
    keep_last: int
    milestone_every: int
    futures: list[Future]
    executor: ThreadPoolExecutor | None


_PENDING: _Pending | None = None
_ASYNC_GROUP: Any = None


def _async_group() -> Any:
    """A gloo group of its own for background saves: they never share the training collectives."""
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None:
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def save_checkpoint(
    checkpoints: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    *,
    milestone_every: int = 0,
    async_save: bool = False,
    warn: Warn | None = None,
) -> Path:
    """Write checkpoint `step` atomically and durably, then apply retention. Collective if dist.

    Retention keeps the newest `keep_last` and every `milestone_every`-th step (0: none).
    `async_save` (several processes only; one process always saves synchronously) returns once
    the state is copied and writes the shards in the background: the checkpoint appears when
    `finalize_pending()` runs (the next save calls it). Raises NonFiniteCheckpointError before
    writing anything if a weight or optimizer value is NaN/Inf; an OSError (e.g. a full disk)
    removes the partial `step_N.tmp/` and leaves the earlier checkpoints as they were.
    """
    finalize_pending()
    checkpoints = Path(checkpoints)
    final = step_dir(checkpoints, step)
    tmp = final.with_name(final.name + ".tmp")
    rank, sharded = _rank(), _is_dist()
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        check_finite(step, _nested_tensors("model", model_sd) + _nested_tensors("optim", optim_sd))
    else:
        model_sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        opt_tensors, plain = flatten_optimizer(optimizer.state_dict())
        names = _optimizer_names(model, optimizer)
        named_opt = []
        for key, v in opt_tensors.items():
            _, idx, what = key.split(".", 2)
            named_opt.append((f"optimizer {what} of {names.get(int(idx), idx)}", v))
        check_finite(step, [(f"model {k}", v) for k, v in model_sd.items()] + named_opt)
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        clean_checkpoints(checkpoints, warn)
        tmp.mkdir()
    _barrier()
    futures: list[Future] = []
    executor = None
    try:
        if sharded:
            futures, executor = _save_sharded(tmp, model, model_sd, optim_sd, async_save)
        else:
            save_file(model_sd, str(tmp / "model.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(plain))
            save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        chaos.point("save")  # a kill mid-save (chaos tests)
        if rank == 0:
            full = {"format": FORMAT_VERSION, "step": step, **state}
            (tmp / "state.json").write_text(json.dumps(full, indent=1))
    except BaseException as e:
        _discard(tmp, executor)
        if isinstance(e, OSError):
            raise _write_error(e, step, tmp) from e
        raise
    pending = _Pending(checkpoints, step, tmp, final, keep_last, milestone_every, futures, executor)
    if futures:
        global _PENDING
        _PENDING = pending
        return final
    return _finish(pending)


def _save_sharded(
    tmp: Path, model: nn.Module, model_sd: dict, optim_sd: dict, async_save: bool
) -> tuple[list[Future], ThreadPoolExecutor | None]:
    """DCP shards of model and optimizer, this rank's RNG, and (rank 0) the consolidated model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank = _rank()
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )  # collective; the full tensors land on rank 0 only
    sd = {"model": model_sd, "optim": optim_sd}
    futures: list[Future] = []
    executor = None
    if async_save:
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        out = dcp.async_save(sd, checkpoint_id=str(tmp / "dcp"), process_group=_async_group())
        futures.append(out.upload_completion if isinstance(out, AsyncSaveResponse) else out)
    else:
        dcp.save(sd, checkpoint_id=str(tmp / "dcp"))
    save_file(rng_tensors(), str(tmp / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        # cpu_offload may return the parameters themselves (an unsharded model on CPU): copy them
        # when the training loop goes on while the file is written.
        full = {k: (v.clone() if async_save else v).contiguous() for k, v in full.items()}
        if async_save:
            executor = ThreadPoolExecutor(1, thread_name_prefix="crucible-ckpt")
            futures.append(executor.submit(save_file, full, str(tmp / "model.safetensors")))
        else:
            save_file(full, str(tmp / "model.safetensors"))
    return futures, executor


def _discard(tmp: Path, executor: ThreadPoolExecutor | None) -> None:
    if executor is not None:
        executor.shutdown(wait=True)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_error(e: OSError, step: int, tmp: Path) -> OSError:
    """An OSError (full disk, permissions, ...) restated with what was and was not lost."""
    code = e.errno or errno.EIO
    what = e.strerror or str(e)
    return OSError(
        code,
        f"checkpoint step {step} not written ({what}); its partial {tmp.name}/ was removed and "
        "the earlier checkpoints are intact",
    )


def finalize_pending() -> Path | None:
    """Complete an async save: wait for its writes, then manifest, rename and retention.

    Collective under torchrun; a no-op (returns None) when nothing is pending. Call it at the
    end of training (and before reading the checkpoints directory); each save calls it first.
    """
    global _PENDING
    pending, _PENDING = _PENDING, None
    if pending is None:
        return None
    try:
        for f in pending.futures:
            f.result()
    except BaseException as e:
        _discard(pending.tmp, pending.executor)
        if isinstance(e, OSError):
            raise _write_error(e, pending.step, pending.tmp) from e
        raise
    if pending.executor is not None:
        pending.executor.shutdown(wait=True)
    return _finish(pending)


def _finish(p: _Pending) -> Path:
    """Every rank fsyncs and hashes its share of the files; rank 0 writes the manifest, renames
    `step_N.tmp` to `step_N` (replacing an earlier attempt at this step) and prunes."""
    rank, sharded = _rank(), _is_dist()
    world = dist.get_world_size() if sharded else 1
    _barrier()  # every rank's files are written
    rels = checkpoint_files(p.tmp)
    entries = describe_files(p.tmp, rels[rank::world])
    if sharded:
        write_part(p.tmp, rank, entries)
        dist.barrier()
    if rank == 0:
        if sharded:
            entries = read_parts(p.tmp)
        write_manifest(p.tmp, p.step, entries)
        fsync_dirs(p.tmp)
        doomed = None
        if p.final.exists():
            doomed = p.final.with_name(p.final.name + ".deleting")
            shutil.rmtree(doomed, ignore_errors=True)
            p.final.rename(doomed)
        p.tmp.rename(p.final)
        fsync_path(p.checkpoints)
        if doomed is not None:
            shutil.rmtree(doomed)
        prune_checkpoints(p.checkpoints, p.step, p.keep_last, p.milestone_every)
    _barrier()
    return p.final


def save_weights_checkpoint(ckpt: Path, weights: dict[str, torch.Tensor], state: dict) -> Path:
    """A weights-only checkpoint directory (a merge, an import): model.safetensors, state.json
    and the manifest, so every reader verifies it like a training checkpoint. Written in place:
    the caller builds it inside a directory it renames into position."""
    ckpt = Path(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    check_finite(int(state.get("step", 0)), list(weights.items()))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(ckpt / "model.safetensors"))
    full = {"format": FORMAT_VERSION, "weights_only": True, **state}
    (ckpt / "state.json").write_text(json.dumps(full, indent=1))
    write_manifest(ckpt, int(full.get("step", 0)), describe_files(ckpt, checkpoint_files(ckpt)))
    return ckpt


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "state.json").read_text())


def check_init_from(
    ckpt: Path, world: int | None = None, *, warn: Warn | None = None
) -> dict[str, Any]:
    """Preflight of `checkpoint.init_from`: an intact checkpoint (manifest verified, every byte
    hashed), of any world size (`world` is not needed: loading is elastic). Raises ValueError
    with one line naming the problem."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ValueError(f"checkpoint.init_from {ckpt}: no such checkpoint directory")
    if not (ckpt / "state.json").is_file():
        raise ValueError(
            f"checkpoint.init_from {ckpt}: incomplete checkpoint (no state.json); "
            "give a step_N directory of a run"
        )
    problems = verify_checkpoint(ckpt, "hash")
    if problems:
        raise ValueError(f"checkpoint.init_from {ckpt}: damaged checkpoint: {problems[0]}")
    if is_legacy(ckpt):
        (warn or default_warn)(f"checkpoint {ckpt} predates manifests (format 1): unverified")
    state = read_state(ckpt)
    _check_layout(ckpt, state)
    return state


def find_resume_checkpoint(checkpoints: Path, *, warn: Warn | None = None) -> Path | None:
    """What `--resume` continues from: leftovers removed, the newest intact checkpoint (every byte
    hashed), with a warning for each damaged one skipped. Collective under torchrun: rank 0
    cleans and verifies, the other ranks receive its answer."""
    if not _is_dist():
        clean_checkpoints(checkpoints, warn)
        return latest_checkpoint(checkpoints, "hash", warn)
    step = -1
    if _rank() == 0:
        clean_checkpoints(checkpoints, warn)
        found = latest_checkpoint(checkpoints, "hash", warn)
        step = read_state(found)["step"] if found is not None else -1
    t = torch.tensor([step], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    step = int(t.item())
    return step_dir(checkpoints, step) if step >= 0 else None


def _check_layout(ckpt: Path, state: dict[str, Any]) -> None:
    """A checkpoint holds the files an elastic load needs: shards, or the full safetensors."""
    if int(state.get("world_size", 1)) > 1:
        need = ["dcp", "rng_rank0.safetensors"]
    else:
        need = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors"]
    missing = [f for f in need if not (ckpt / f).exists()]
    if missing:
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, no {missing[0]}")


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and RNG states in place; return the saved state.json.

    Elastic: a checkpoint of any world size loads on any other (DDP, FSDP2 or one process).
    A sharded save (`dcp/`) is read through DCP, which reshards to the current layout (also in
    one process); a single-process save is read from its safetensors, on rank 0, and broadcast
    and sharded by `set_state_dict`. RNG: see `rng_file`. The global data order is unaffected:
    the loader is a pure, rank-independent function of the step.

    Does not verify the manifest (find_resume_checkpoint / latest_checkpoint / check_init_from
    have). `dcp/` is read through the restricted reader of checkpoint_dcp.
    """
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    _check_layout(ckpt, state)
    world = dist.get_world_size() if _is_dist() else 1
    if (ckpt / "dcp").is_dir():
        load_sharded(ckpt, model, optimizer)
    elif _is_dist():
        load_full_broadcast(ckpt, model, optimizer)
    else:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(read_optimizer(ckpt))
    set_rng(load_file(str(rng_file(ckpt, int(state.get("world_size", 1)), world, _rank()))))
    return state


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    """Load the model weights of any checkpoint into an unwrapped model, from model.safetensors
    only (never from dcp/, whose index is a pickle). Raises CheckpointError if there is none."""
    ckpt = Path(ckpt)
    path = ckpt / "model.safetensors"
    if not path.is_file():
        hint = ""
        if (ckpt / "dcp").is_dir():
            hint = (
                ": a sharded checkpoint from before format 2 has only dcp/, which is not read "
                "outside --resume (its index is a pickle); resume the run to write one with "
                "model.safetensors"
            )
        raise CheckpointError(f"{ckpt}: no model.safetensors{hint}")
    try:
        weights = load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    model.load_state_dict(weights, strict=True)
