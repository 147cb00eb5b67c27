"""An ablation suite: a baseline config, named variants as dotted overrides, and seeds.

```yaml
name: attention            # optional; default: the file name
baseline: {config: tiny, overrides: [model.num_kv_heads=4]}   # or just `baseline: tiny`
seeds: 2                   # or a list, e.g. [0, 1, 2]
variants:
  gqa: [model.num_kv_heads=2]
  untied:
    overrides: {model.tie_embeddings: false, model.intermediate_size: 640}
    acknowledge_multi_change: true
fork: {step: 40}           # optional: every arm starts from a shared trunk at step 40 (per seed)
```

Everything is resolved and checked here, before any training: unknown keys (named by variant),
forbidden overrides that would break the comparison, and what each variant really changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from crucible.config import ConfigError, RunConfig, load_config
from crucible.plan.flops import train_flops_per_token
from crucible.plan.params import count_params

# Keys a variant may not touch: they set the seed or the token budget (so the data order and the
# amount of training must match between arms), or where the suite puts its runs.
FORBIDDEN = (
    "seed",
    "train.steps",
    "train.global_batch_size",
    "train.seq_len",
    "name",
    "out_dir",
    "train.stop_at",
    "checkpoint.init_from",
)
# Keys that never count as a difference between arms (set per run by the suite).
RUN_KEYS = ("name", "out_dir", "seed", "checkpoint.init_from", "train.threads")
# Set by the suite, never by the baseline.
SUITE_SET = ("seed", "name", "out_dir", "train.stop_at", "checkpoint.init_from")
TRUNK = "trunk"  # the shared run of a forked suite: runs/trunk-s<seed>
PARAM_WARN = 0.05  # warn when a variant moves the parameter count by more than this
_SUITE_KEYS = {"name", "baseline", "variants", "seeds", "out_dir", "description", "fork"}
_VARIANT_KEYS = {"overrides", "acknowledge_multi_change", "description"}


@dataclass
class Variant:
    name: str
    overrides: list[str]
    acknowledge_multi_change: bool = False
    description: str = ""


@dataclass
class Suite:
    name: str
    config: str  # preset name or config file the baseline starts from
    baseline_overrides: list[str]
    variants: list[Variant]
    seeds: list[int]
    out_dir: str | None = None
    description: str = ""
    source: str = ""
    fork_step: int | None = None  # arms start from a shared trunk checkpoint at this step

    def arm_names(self) -> list[str]:
        return ["baseline", *(v.name for v in self.variants)]

    def overrides_of(self, arm: str) -> list[str]:
        extra = [] if arm == "baseline" else self.variant(arm).overrides
        return [*self.baseline_overrides, *extra]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def config_for(self, arm: str, seed: int, runs_dir: Path | None = None) -> RunConfig:
        """The RunConfig of one arm and seed (validated; errors name the arm)."""
        extra = [f"seed={seed}", f"name={arm}-s{seed}"]
        if runs_dir is not None:
            extra.append(f"out_dir={runs_dir}")
        if self.fork_step is not None:
            extra.append(f"checkpoint.init_from={self.trunk_checkpoint(seed, runs_dir)}")
        try:
            return load_config(self.config, [*self.overrides_of(arm), *extra])
        except ConfigError as e:
            who = "baseline" if arm == "baseline" else f"variant '{arm}'"
            raise ConfigError(f"suite {self.name}, {who}: {e}") from None

    def trunk_config(self, seed: int, runs_dir: Path | None = None) -> RunConfig:
        """The shared run of a forked suite: the baseline, stopped at the fork step."""
        assert self.fork_step is not None
        extra = [f"seed={seed}", f"name={TRUNK}-s{seed}", f"train.stop_at={self.fork_step}"]
        if runs_dir is not None:
            extra.append(f"out_dir={runs_dir}")
        try:
            return load_config(self.config, [*self.baseline_overrides, *extra])
        except ConfigError as e:
            raise ConfigError(f"suite {self.name}, trunk: {e}") from None

    def trunk_checkpoint(self, seed: int, runs_dir: Path | None = None) -> Path:
        assert self.fork_step is not None
        return (
            Path(runs_dir or "runs")
            / f"{TRUNK}-s{seed}"
            / "checkpoints"
            / (f"step_{self.fork_step:06d}")
        )


def suite_names() -> list[str]:
    root = resources.files("crucible.presets").joinpath("ablations")
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def _normalise_overrides(raw: Any, where: str) -> list[str]:
    """A list of `a.b=v` strings, or a mapping of dotted keys to values (written as JSON = YAML)."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [f"{k}={json.dumps(v)}" for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(x, str) and "=" in x for x in raw):
        return list(raw)
    raise ConfigError(f"{where}: overrides must be a list of key.path=value or a mapping")


def _override_key(o: str) -> str:
    return o.split("=", 1)[0].strip()


def _parse_seeds(raw: Any, label: str) -> list[int]:
    if isinstance(raw, bool) or raw is None:
        raise ConfigError(f"{label}: `seeds:` is required (a count like 3, or a list of ints)")
    if isinstance(raw, int):
        if raw < 1:
            raise ConfigError(f"{label}: seeds must be >= 1 (got {raw})")
        return list(range(raw))
    if isinstance(raw, list) and raw and all(isinstance(s, int) for s in raw):
        if len(set(raw)) != len(raw):
            raise ConfigError(f"{label}: seeds {raw} repeat a seed")
        return list(raw)
    raise ConfigError(f"{label}: seeds must be a positive count or a list of ints (got {raw!r})")


def parse_suite(data: Any, label: str) -> Suite:
    """Check the suite's own structure (not yet the configs it describes)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping at the top level")
    unknown = set(data) - _SUITE_KEYS
    if unknown:
        raise ConfigError(
            f"{label}: unknown keys {sorted(unknown)} (allowed: {sorted(_SUITE_KEYS)})"
        )
    base = data.get("baseline")
    if base is None:
        raise ConfigError(
            f"{label}: no `baseline:` (a preset/config name, or {{config, overrides}})"
        )
    if isinstance(base, str):
        config, base_over = base, []
    elif isinstance(base, dict) and isinstance(base.get("config"), str):
        extra = set(base) - {"config", "overrides"}
        if extra:
            raise ConfigError(f"{label}: baseline: unknown keys {sorted(extra)}")
        config = base["config"]
        base_over = _normalise_overrides(base.get("overrides"), f"{label}: baseline")
    else:
        raise ConfigError(f"{label}: baseline must be a config name or {{config: ..., overrides}}")
    for o in base_over:
        if _override_key(o) in SUITE_SET:
            raise ConfigError(
                f"{label}: baseline overrides {_override_key(o)}; the suite sets it per run "
                "(use `seeds:` for seeds)"
            )
    seeds = _parse_seeds(data.get("seeds"), label)
    raw_variants = data.get("variants")
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise ConfigError(f"{label}: `variants:` must map variant names to overrides")
    variants = []
    for vname, spec in raw_variants.items():
        where = f"{label}: variant '{vname}'"
        if not isinstance(vname, str) or not vname.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: names may use letters, digits, - and _ only")
        if vname in ("baseline", TRUNK):
            raise ConfigError(f"{where}: '{vname}' is reserved")
        ack, desc = False, ""
        if isinstance(spec, dict) and set(spec) <= _VARIANT_KEYS and "overrides" in spec:
            ack = spec.get("acknowledge_multi_change", False)
            if not isinstance(ack, bool):
                raise ConfigError(f"{where}: acknowledge_multi_change must be true or false")
            desc = str(spec.get("description", ""))
            spec = spec["overrides"]
        overrides = _normalise_overrides(spec, where)
        if not overrides:
            raise ConfigError(f"{where}: no overrides (a variant must change something)")
        for o in overrides:
            key = _override_key(o)
            if key in FORBIDDEN:
                raise ConfigError(
                    f"{where}: may not override {key}: every arm must train the same seeds on "
                    "the same tokens (set it in the baseline instead; seeds via `seeds:`)"
                )
        variants.append(Variant(vname, overrides, ack, desc))
    fork = data.get("fork")
    fork_step = None
    if fork is not None:
        step = fork.get("step") if isinstance(fork, dict) and set(fork) == {"step"} else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError(f"{label}: fork must be {{step: N}} with N >= 1 (got {fork!r})")
        fork_step = step
    return Suite(
        name=str(data.get("name") or Path(label).stem),
        config=config,
        baseline_overrides=base_over,
        variants=variants,
        seeds=seeds,
        out_dir=data.get("out_dir"),
        description=str(data.get("description", "")),
        source=label,
        fork_step=fork_step,
    )


def load_suite(source: str | Path) -> Suite:
    """A suite file, or the name of a shipped example suite (crucible/presets/ablations)."""
    path = Path(source)
    if path.is_file():
        text, label = path.read_text(), str(path)
        suite_dir = path.parent
    elif str(source) in suite_names():
        root = resources.files("crucible.presets").joinpath("ablations")
        text, label, suite_dir = root.joinpath(f"{source}.yaml").read_text(), str(source), None
    else:
        raise ConfigError(
            f"{source}: no such suite file or example suite (examples: {', '.join(suite_names())})"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{label}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    suite = parse_suite(data, label)
    # A baseline config file is found relative to the suite file, like `base:` in configs.
    if suite_dir is not None and (suite_dir / suite.config).is_file():
        suite.config = str(suite_dir / suite.config)
    return suite


# --------------------------------------------------------------------------- the resolved diff


def flatten(cfg: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump(mode="json"))
    return {k: v for k, v in out.items() if k not in RUN_KEYS}


@dataclass
class ArmPlan:
    """What one arm is, resolved: its config, its changes against the baseline, its size."""

    name: str
    config: RunConfig
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (baseline, arm)
    params: int = 0
    flops_per_token: float = 0.0
    param_delta: float = 0.0  # relative to the baseline
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.config.train.steps * self.config.train.tokens_per_step


def plan_arms(suite: Suite) -> list[ArmPlan]:
    """Resolve every arm (seed 0) and compare it with the baseline; raises ConfigError early."""
    base_cfg = suite.config_for("baseline", suite.seeds[0])
    if suite.fork_step is not None:
        if suite.fork_step >= base_cfg.train.steps:
            raise ConfigError(
                f"suite {suite.name}: fork step {suite.fork_step} must be before train.steps "
                f"{base_cfg.train.steps}"
            )
        suite.trunk_config(suite.seeds[0])  # errors surface now
    base_flat = flatten(base_cfg)
    arms = []
    for arm in suite.arm_names():
        cfg = suite.config_for(arm, suite.seeds[0])
        flat = flatten(cfg)
        changes = {
            k: (base_flat.get(k), flat.get(k))
            for k in sorted(set(base_flat) | set(flat))
            if base_flat.get(k) != flat.get(k)
        }
        p = ArmPlan(arm, cfg, changes)
        p.params = count_params(cfg.model).total
        p.flops_per_token = train_flops_per_token(cfg.model, cfg.train.seq_len)
        arms.append(p)
    base = arms[0]
    for p in arms[1:]:
        if p.tokens != base.tokens:  # defensive: FORBIDDEN should already prevent this
            raise ConfigError(
                f"suite {suite.name}, variant '{p.name}': trains {p.tokens:,} tokens, the "
                f"baseline {base.tokens:,}; arms must see the same tokens"
            )
        p.param_delta = p.params / base.params - 1
        if not p.changes:
            p.warnings.append("changes nothing against the baseline (an A/A control?)")
        if len(p.changes) > 1 and not suite.variant(p.name).acknowledge_multi_change:
            p.warnings.append(
                f"changes {len(p.changes)} things ({', '.join(p.changes)}): the effect cannot be "
                "attributed to one (set acknowledge_multi_change: true if intended)"
            )
        if suite.fork_step is not None and any(k.startswith("model.") for k in p.changes):
            p.warnings.append(
                "changes the model in a forked suite: the trunk's weights must still fit it"
            )
        if abs(p.param_delta) > PARAM_WARN:
            p.warnings.append(
                f"parameters move by {p.param_delta:+.1%} ({base.params:,} -> {p.params:,}): "
                "part of any difference may be model size"
            )
    return arms


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def format_plan(suite: Suite, arms: list[ArmPlan]) -> str:
    """Human-readable: per variant what differs, its size and FLOPs/token, and warnings."""
    base = arms[0]
    lines = [
        f"ablation suite {suite.name}: baseline {suite.config}"
        + (f" + {' '.join(suite.baseline_overrides)}" if suite.baseline_overrides else ""),
        f"  seeds {suite.seeds}; {len(arms)} arms x {len(suite.seeds)} seeds = "
        f"{len(arms) * len(suite.seeds)} runs of {base.tokens:,} tokens each",
        f"  baseline: {base.params:,} params, {base.flops_per_token:.4g} FLOPs/token",
    ]
    if suite.fork_step is not None:
        lines.append(
            f"  forked: per seed, one trunk run (the baseline) to step {suite.fork_step}; every "
            f"arm starts from its checkpoint and trains steps {suite.fork_step + 1}.."
            f"{base.config.train.steps}"
        )
    for p in arms[1:]:
        lines.append(
            f"  {p.name}: {p.params:,} params ({p.param_delta:+.1%}), "
            f"{p.flops_per_token:.4g} FLOPs/token ({p.flops_per_token / base.flops_per_token - 1:+.1%})"
        )
        for k, (a, b) in p.changes.items():
            lines.append(f"      {k}: {_show(a)} -> {_show(b)}")
        for w in p.warnings:
            lines.append(f"      WARNING: {w}")
    return "\n".join(lines)
