"""The non-model parts of a checkpoint as safetensors + JSON: RNG states and optimizer state."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------- RNG


def rng_tensors() -> dict[str, torch.Tensor]:
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


def set_rng(t: dict[str, torch.Tensor]) -> None:
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


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.contiguous()
            else:
                plain["state"].setdefault(str(idx), {})[k] = v
    return tensors, plain


def unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in plain["state"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": plain["param_groups"]}
