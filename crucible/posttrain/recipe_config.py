"""The recipe YAML of `crucible recipe`: stages of existing commands, validated with pydantic.

    name: recipe-tiny
    out_dir: runs/recipe-tiny        # default runs/<name>; stage STAGE writes OUT_DIR/STAGE
    base: runs/base                  # an existing run directory; stages refer to it as `base`
    threads: 1                       # torch CPU threads of every stage (train.threads too)
    stages:
      - {name: chat, kind: chat-data, train: 2000, test: 100}
      - {name: mid, kind: train, input: base, config: tiny,
         overrides: ["data.sources={code: 'stdlib:code', chat: 'chat:${chat}/train.jsonl'}", ...]}
      - {name: sft, kind: sft, input: mid, config: sft-tiny, overrides: [train.steps=100]}
      - {name: pairs, kind: pref-data, input: sft, n: 100, samples: 8}
      - {name: apo, kind: dpo, input: sft, config: apo.yaml, data: pairs}
      - name: merged
        kind: merge
        merges: [{name: soup, merge_method: model_soup, models: [{model: apo}, ...]}, ...]
    eval: {chat_data: "${chat}/test.jsonl", limit: 60, tasks: stdlib_bpb, task_limit: 20}

`input` names the model a stage starts from (`base` or an earlier stage); `${NAME}` anywhere in
an override, a merge model or eval.chat_data is the run directory of `base` or stage NAME. Every
error is one line naming the stage and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crucible.config import ConfigError

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
REF = re.compile(r"\$\{([^}]*)\}")
RESERVED = {"base", "eval", "report"}  # base is the starting run; eval/ holds the evaluations
MODEL_KINDS = {"train", "sft", "dpo", "merge"}  # stages whose output is a model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Stage(_Strict):
    name: str = Field(pattern=NAME, description="The stage's run directory under out_dir.")
    kind: str


class _TrainLike(_Stage):
    input: str = Field(description="The model to start from: base or an earlier model stage.")
    config: str = Field(description="The command's YAML config or a shipped preset name.")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides")


class ChatDataStage(_Stage):
    """`crucible chat-data`: the synthetic chat data set (train.jsonl, test.jsonl)."""

    kind: Literal["chat-data"]
    train: int = Field(2000, ge=1)
    test: int = Field(200, ge=0)
    seed: int = 0
    tasks: str | None = None


class TrainStage(_TrainLike):
    """`crucible train`, started from the input's latest checkpoint (checkpoint.init_from):
    mid-training when the config's data is a mixture with a `chat:` source."""

    kind: Literal["train"]


class SFTStage(_TrainLike):
    """`crucible sft` with sft.base = the input."""

    kind: Literal["sft"]


class DPOStage(_TrainLike):
    """`crucible dpo` with dpo.init_from = the input and dpo.data = a pref-data stage's pairs."""

    kind: Literal["dpo"]
    data: str = Field(description="A pref-data stage (its pairs.jsonl) or a JSONL file.")


class PrefDataStage(_Stage):
    """`crucible pref-data` with --chosen-from = the input; writes STAGE/pairs.jsonl."""

    kind: Literal["pref-data"]
    input: str
    rejected_from: str | None = None
    n: int = Field(200, ge=1)
    samples: int = Field(4, ge=1)
    seed: int = 0
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    verifier: str = "last_number"
    think: bool = False


class MergeStage(_Stage):
    """`crucible merge`: the merge documents, whose `model:` may name base or a model stage."""

    kind: Literal["merge"]
    merges: list[dict[str, Any]] = Field(min_length=1)


KINDS: dict[str, type[_Stage]] = {
    "chat-data": ChatDataStage,
    "train": TrainStage,
    "sft": SFTStage,
    "pref-data": PrefDataStage,
    "dpo": DPOStage,
    "merge": MergeStage,
}
Stage = ChatDataStage | TrainStage | SFTStage | PrefDataStage | DPOStage | MergeStage


class EvalSection(_Strict):
    """Every listed model (default: base and every model stage) on the same held-out data."""

    chat_data: str = Field(description="Held-out conversations (JSONL) for eval-chat.")
    limit: int | None = Field(None, ge=1, description="First N conversations.")
    max_new_tokens: int = Field(128, ge=1)
    tasks: str | None = Field("stdlib_bpb", description="`crucible eval --tasks`; null: none.")
    task_limit: int | None = Field(None, ge=1, description="Documents per task.")
    stages: list[str] | None = None


class Recipe(_Strict):
    name: str = Field(pattern=NAME)
    out_dir: str | None = None
    base: str = Field(description="An existing run directory: the model the recipe starts from.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads of every stage.")
    stages: list[dict[str, Any]] = Field(min_length=1)
    eval: EvalSection | None = None


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


def refs(text: str) -> list[str]:
    """The stage names a string refers to as ${NAME}."""
    return REF.findall(text)


def substitute(text: str, dirs: dict[str, Path]) -> str:
    return REF.sub(lambda m: str(dirs[m.group(1)]), text)


def stage_refs(stage: Stage) -> list[tuple[str, str]]:
    """(field, name) of every stage this one reads: its input, its data and ${NAME}s."""
    out: list[tuple[str, str]] = []
    for field in ("input", "rejected_from"):
        name = getattr(stage, field, None)
        if name:
            out.append((field, name))
    if isinstance(stage, DPOStage) and not stage.data.endswith((".jsonl", ".json")):
        out.append(("data", stage.data))
    for i, o in enumerate(getattr(stage, "overrides", [])):
        out += [(f"overrides[{i}]", n) for n in refs(o)]
    if isinstance(stage, MergeStage):
        for field, model in merge_models(stage):
            # a bare name is a stage; anything with a slash is a path, checked by the merge
            bare = [] if "/" in model or refs(model) else [(field, model)]
            out += [(field, n) for n in refs(model)] + bare
    return out


def merge_models(stage: MergeStage) -> list[tuple[str, str]]:
    """(field, model reference) of each merge document's models, except earlier merges."""
    earlier: set[str] = set()
    out = []
    for i, doc in enumerate(stage.merges):
        entries = [("base_model", doc.get("base_model"))] if doc.get("base_model") else []
        for j, m in enumerate(doc.get("models") or []):
            if isinstance(m, dict) and isinstance(m.get("model"), str):
                entries.append((f"models[{j}].model", m["model"]))
        out += [(f"merges[{i}].{f}", ref) for f, ref in entries if ref not in earlier]
        if isinstance(doc.get("name"), str):
            earlier.add(doc["name"])
    return out


def parse_recipe(data: Any, label: str) -> tuple[Recipe, list[Stage]]:
    """The recipe and its typed stages; names unique, references to base or earlier stages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: a recipe is a mapping with name, base and stages")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{label}: {_one_line(e)}") from None
    stages: list[Stage] = []
    kinds: dict[str, str] = {"base": "base"}
    for i, raw in enumerate(recipe.stages):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = f"{label}: stage {name!r}" if isinstance(name, str) else f"{label}: stages[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with name and kind")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind: unknown stage kind {kind!r} "
                              f"(known: {', '.join(KINDS)})")  # fmt: skip
        try:
            stage = KINDS[kind].model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"{where} ({kind}): {_one_line(e)}") from None
        if stage.name in RESERVED or stage.name in kinds:
            why = "is reserved" if stage.name in RESERVED else "is used twice"
            raise ConfigError(f"{where} ({kind}): name: {stage.name!r} {why}")
        for field, ref in stage_refs(stage):  # type: ignore[arg-type]
            _check_ref(where, kind, field, ref, kinds)
        kinds[stage.name] = kind
        stages.append(stage)  # type: ignore[arg-type]
    if recipe.eval is not None:
        for ref in refs(recipe.eval.chat_data):
            if ref not in kinds:
                raise ConfigError(f"{label}: eval.chat_data: ${{{ref}}} is not an earlier stage")
        for name in recipe.eval.stages or []:
            if kinds.get(name) not in {"base", *MODEL_KINDS}:
                raise ConfigError(f"{label}: eval.stages: {name!r} is not base or a model stage")
    return recipe, stages


def _check_ref(where: str, kind: str, field: str, ref: str, kinds: dict[str, str]) -> None:
    if ref not in kinds:
        raise ConfigError(
            f"{where} ({kind}): {field}: {ref!r} is neither base nor an earlier stage "
            f"(earlier: {', '.join(kinds)})"
        )
    want_model = field in ("input", "rejected_from") or field.startswith("merges")
    if want_model and kinds[ref] not in {"base", *MODEL_KINDS}:
        raise ConfigError(f"{where} ({kind}): {field}: {ref!r} is a {kinds[ref]} stage, "
                          "not a model")  # fmt: skip
    if field == "data" and kinds[ref] != "pref-data":
        raise ConfigError(f"{where} ({kind}): data: {ref!r} is not a pref-data stage")


def read_recipe(path: str | Path) -> tuple[Recipe, list[Stage]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    return parse_recipe(data, str(path))
