"""The merge YAML, close to mergekit's, validated with pydantic (unknown keys are errors).

    merge_method: ties            # linear, model_soup, slerp, task_arithmetic, ties,
                                  # dare_linear, dare_ties
    base_model: runs/base         # slerp and the task-arithmetic family
    models:
      - model: runs/apo-a         # a run directory (latest checkpoint), a checkpoint directory
        parameters:               # (runs/x/checkpoints/step_N) or a Hugging Face directory
          weight: 0.5
          density: 0.7
    parameters: {normalize: true, lambda: 1.0, rescale: true, t: 0.5}
    dtype: float32                # output dtype (default: the base model's, else the first's)
    seed: 0                       # DARE's random drop

A scalar parameter is a number or mergekit's filter list, [{filter: self_attn, value: 0.3},
{value: 0.7}]: the first entry whose filter is a substring of the tensor name applies, an entry
without a filter matches everything. Several merges in one file (YAML documents separated by
`---`, each with a `name`) run in order, and a later `model:` may name an earlier merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crucible.config import ConfigError
from crucible.posttrain.merge import METHODS, NEEDS_BASE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FilterValue(_Strict):
    filter: str | None = None
    value: float


Scalar = float | list[FilterValue]


def resolve(value: Scalar | None, tensor: str, default: float | None = None) -> float | None:
    """The value of a parameter for one tensor (filters: first substring match wins)."""
    if value is None or isinstance(value, float | int):
        return default if value is None else float(value)
    for entry in value:
        if entry.filter is None or entry.filter in tensor:
            return entry.value
    return default


class ModelParams(_Strict):
    weight: Scalar | None = None
    density: Scalar | None = None


class ModelEntry(_Strict):
    model: str = Field(description="run directory, checkpoint directory, HF directory or a name")
    parameters: ModelParams = Field(default_factory=ModelParams)


class GlobalParams(_Strict):
    weight: Scalar | None = None  # default weight of every model
    density: Scalar | None = None  # default density of every model
    normalize: bool | None = None  # default: the method's (mergekit's registry)
    rescale: bool | None = None
    lambda_: float = Field(1.0, alias="lambda")
    t: Scalar | None = None


class MergeSpec(_Strict):
    name: str | None = None
    merge_method: Literal[METHODS]  # type: ignore[valid-type]
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: GlobalParams = Field(default_factory=GlobalParams)
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        m = self.merge_method
        if m in NEEDS_BASE and not self.base_model:
            raise ValueError(f"merge_method {m} needs base_model")
        if m in ("linear", "model_soup") and self.base_model:
            raise ValueError(f"merge_method {m} takes no base_model: list every model in models")
        others = self.others()
        if m == "slerp":
            if len(others) != 1:
                raise ValueError(
                    f"slerp merges base_model with exactly one other model, got {len(others)}"
                )
            if self.parameters.t is None:
                raise ValueError("slerp needs parameters.t (0 = base_model, 1 = the other model)")
        if m == "model_soup":
            if any(e.parameters.weight is not None for e in self.models) or (
                self.parameters.weight is not None
            ):
                raise ValueError("model_soup averages uniformly and takes no weight; use linear")
        elif m != "slerp":
            missing = [e.model for e in others if e.parameters.weight is None]
            if missing and self.parameters.weight is None:
                raise ValueError(f"merge_method {m} needs a weight for model {missing[0]}")
        densities = [e for e in self.models if e.parameters.density is not None]
        if m in ("slerp", "linear", "model_soup") and (
            densities or self.parameters.density is not None
        ):
            raise ValueError(f"density is a parameter of ties / dare_*, not of {m}")
        return self

    def others(self) -> list[ModelEntry]:
        """The models merged into the base (all models when there is no base)."""
        return [e for e in self.models if e.model != self.base_model]

    def sources(self) -> list[str]:
        """Every model this merge reads, base first."""
        names = [self.base_model] if self.base_model else []
        return list(dict.fromkeys([*names, *(e.model for e in self.models)]))


def _label_error(err: ValidationError, label: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return f"{label}: " + "; ".join(parts)


def parse_specs(docs: list[Any], label: str) -> list[MergeSpec]:
    """Validated merges from YAML documents; a name used before it is defined is an error."""
    docs = [d for d in docs if d is not None]
    if not docs:
        raise ConfigError(f"{label}: empty merge config")
    specs: list[MergeSpec] = []
    for i, d in enumerate(docs):
        where = label if len(docs) == 1 else f"{label} (document {i + 1})"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping with merge_method and models")
        try:
            spec = MergeSpec.model_validate(d)
        except ValidationError as e:
            raise ConfigError(_label_error(e, where)) from None
        if len(docs) > 1 and not spec.name:
            raise ConfigError(f"{where}: every merge of a multi-document file needs a name")
        if spec.name in {s.name for s in specs}:
            raise ConfigError(f"{where}: name {spec.name!r} is used twice")
        specs.append(spec)
    return specs


def load_specs(path: str | Path) -> list[MergeSpec]:
    """The merges of a YAML file (one document, or several separated by `---`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: merge config not found")
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    return parse_specs(docs, str(path))
