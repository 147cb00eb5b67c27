"""Checkpoints: complete or absent, never partial, and loadable without unpickling.

Layout of `checkpoints/step_000123/`:

- `state.json`: step, tokens seen, data-loader position, world size and strategy, format version.
- one process: `model.safetensors`, `optimizer.safetensors` + `optimizer.json` (the tensors and
  the plain values of `optimizer.state_dict()`), `rng.safetensors` (torch CPU/CUDA generators) and
  python/numpy generator states in `state.json`.
- several processes: `dcp/`, a sharded `torch.distributed.checkpoint` of model and optimizer, and
  one `rng_rank{r}.safetensors` per rank.

Everything is written under `step_000123.tmp/` and renamed into place by rank 0 once all ranks
have finished, so a crash mid-write never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from crucible.train import chaos

FORMAT_VERSION = 1


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint would record non-finite weights or optimizer state; it is not written."""


_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step_{step:06d}"


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a `.tmp` directory or one without state.json is not)."""
    if not checkpoints.is_dir():
        return []
    found = []
    for p in checkpoints.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = list_checkpoints(checkpoints)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- RNG


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    out["numpy_meta"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy_cached"] = torch.tensor([cached], dtype=torch.float64)
    version, state, gauss = random.getstate()
    out["python_state"] = torch.tensor(state, dtype=torch.int64)
    out["python_meta"] = torch.tensor([version], dtype=torch.int64)
    out["python_gauss"] = torch.tensor([float("nan") if gauss is None else gauss])
    return out


def _set_rng(t: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(t["torch_cpu"])
    cuda = [t[k] for k in sorted(k for k in t if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    pos, has_gauss = (int(x) for x in t["numpy_meta"])
    keys = t["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(t["numpy_cached"][0])))
    gauss = float(t["python_gauss"][0])
    random.setstate(
        (
            int(t["python_meta"][0]),
            tuple(int(x) for x in t["python_state"]),
            None if gauss != gauss else gauss,
        )
    )


# --------------------------------------------------------------------------- optimizer state


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.contiguous()
            else:
                plain["state"].setdefault(str(idx), {})[k] = v
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in plain["state"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": plain["param_groups"]}


# --------------------------------------------------------------------------- save / load


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def save_checkpoint(
    checkpoints: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically; prune to the newest `keep_last`. Collective if dist."""
    final = step_dir(checkpoints, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if _is_dist():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        save_file(_rng_tensors(), str(tmp / f"rng_rank{rank}.safetensors"))
        dist.barrier()
    else:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp / "model.safetensors"),
        )
        tensors, plain = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(plain))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
    chaos.point("save")
    if rank == 0:
        full = {"format": FORMAT_VERSION, "step": step, **state}
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(checkpoints)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            chaos.point("prune")
    if _is_dist():
        dist.barrier()
    return final


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


def check_world_size(ckpt: Path, state: dict[str, Any], world: int) -> None:
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        raise ValueError(
            f"{ckpt}: saved with {saved_world} process(es), resuming with {world}; "
            "resume with the same world size"
        )


def check_init_from(ckpt: Path, world: int) -> dict[str, Any]:
    """Preflight of `checkpoint.init_from`: a complete checkpoint of this world size."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ValueError(f"checkpoint.init_from {ckpt}: no such checkpoint directory")
    if not (ckpt / "state.json").is_file():
        raise ValueError(
            f"checkpoint.init_from {ckpt}: incomplete checkpoint (no state.json); "
            "give a step_N directory of a run"
        )
    state = read_state(ckpt)
    check_world_size(ckpt, state, world)
    return state


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and RNG states in place; return the saved state.json."""
    state = read_state(ckpt)
    check_world_size(ckpt, state, dist.get_world_size() if _is_dist() else 1)
    if _is_dist():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(ckpt / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        _set_rng(load_file(str(ckpt / f"rng_rank{_rank()}.safetensors")))
    else:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
        if optimizer is not None:
            plain = json.loads((ckpt / "optimizer.json").read_text())
            tensors = load_file(str(ckpt / "optimizer.safetensors"))
            optimizer.load_state_dict(_unflatten_optimizer(tensors, plain))
        _set_rng(load_file(str(ckpt / "rng.safetensors")))
    return state


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    """Load only the model weights of any checkpoint into an unwrapped model, one process.

    Sharded (DCP) checkpoints are read without a process group; DCP reassembles the shards.
    """
    if (ckpt / "model.safetensors").is_file():
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
        return
    import warnings

    import torch.distributed.checkpoint as dcp

    sd = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(ckpt / "dcp"))
    model.load_state_dict(sd["model"], strict=True)
