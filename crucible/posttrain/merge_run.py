"""Apply a merge config to whole models: tensor by tensor, with per-tensor parameters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crucible.config import ConfigError
from crucible.posttrain.merge import Method, linear, slerp, task_arithmetic_family
from crucible.posttrain.merge_config import MergeSpec, resolve
from crucible.posttrain.merge_io import Source, check_compatible, load_source

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}  # fmt: skip


def _method(spec: MergeSpec) -> Method:
    p = spec.parameters
    return Method(spec.merge_method, p.normalize, p.rescale, p.lambda_, spec.seed)


def merge_tensor(spec: MergeSpec, name: str, tensors: dict[str, Tensor]) -> Tensor:
    """One merged tensor; `tensors` maps each model reference of the spec to its tensor."""
    m, g = spec.merge_method, spec.parameters
    method = _method(spec)
    others = spec.others()
    if m == "model_soup":
        return linear([tensors[e.model] for e in others], [1.0] * len(others), True)

    def weight(e) -> float:
        w = resolve(e.parameters.weight, name) if e.parameters.weight is not None else None
        w = resolve(g.weight, name) if w is None else w
        if w is None:
            raise ConfigError(f"model {e.model}: no weight applies to tensor {name}")
        return w

    def density(e) -> float:
        d = resolve(e.parameters.density, name) if e.parameters.density is not None else None
        return resolve(g.density, name, 1.0) if d is None else d  # type: ignore[return-value]

    if m == "linear":
        normalize = method.default_normalize() if g.normalize is None else g.normalize
        return linear([tensors[e.model] for e in others], [weight(e) for e in others], normalize)
    base = tensors[spec.base_model]  # type: ignore[index]
    if m == "slerp":
        t = resolve(g.t, name)
        if t is None:
            raise ConfigError(f"slerp: no value of parameters.t applies to tensor {name}")
        return slerp(t, base, tensors[others[0].model])
    return task_arithmetic_family(
        method,
        base,
        [tensors[e.model] for e in others],
        [weight(e) for e in others],
        [density(e) for e in others],
        name,
    )


def merge_state(spec: MergeSpec, sources: dict[str, Source]) -> dict[str, Tensor]:
    """The merged state dict, in the dtype of the config (default: the first source's)."""
    ordered = [sources[r] for r in spec.sources()]
    check_compatible(ordered)
    first = ordered[0].state
    out: dict[str, Tensor] = {}
    for name, ref in first.items():
        dtype = _DTYPES[spec.dtype] if spec.dtype else ref.dtype
        if not ref.is_floating_point():
            out[name] = ref.clone()  # nothing to interpolate (integer buffers)
            continue
        merged = merge_tensor(spec, name, {r: s.state[name] for r, s in sources.items()})
        out[name] = merged.to(dtype)
    return out


def run_merges(
    specs: list[MergeSpec],
    config_dir: Path | None = None,
    loader: Callable[[str, Path | None], Source] = load_source,
    loaded: dict[str, Source] | None = None,
) -> tuple[dict[str, Tensor], Source, dict[str, Any]]:
    """Run the merges in order; return (final state, template source, recipe for provenance).

    `loaded` caches sources across calls (the weight search reuses the inputs).
    """
    cache: dict[str, Source] = loaded if loaded is not None else {}
    named: dict[str, Source] = {}
    state: dict[str, Tensor] = {}
    template: Source | None = None
    for spec in specs:
        sources: dict[str, Source] = {}
        for ref in spec.sources():
            if ref in named:
                sources[ref] = named[ref]
            else:
                if ref not in cache:
                    cache[ref] = loader(ref, config_dir)
                sources[ref] = cache[ref]
        state = merge_state(spec, sources)
        template = sources[spec.sources()[0]]
        result = Source(spec.name or "merge", state, template.model_cfg, template.run_cfg,
                        template.tokenizer)  # fmt: skip
        if spec.name:
            named[spec.name] = result
        template = result
    assert template is not None
    recipe = {"merges": [s.model_dump(mode="json", by_alias=True, exclude_none=True)
                         for s in specs]}  # fmt: skip
    return state, template, recipe
