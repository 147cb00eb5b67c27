"""`crucible recipe RECIPE.yaml`: run post-training stages end to end with the existing commands.

Each stage is one command line of `crucible train|sft|pref-data|dpo|merge|chat-data`, run in this
process through the CLI's own parser, with its input (the previous stage's run directory) filled
in. The whole recipe is validated first (every stage's config, its references); then the stages
run in order, each writing OUT_DIR/STAGE, then every model is evaluated on the same held-out data
(`crucible eval-chat` and `crucible eval --tasks`), and OUT_DIR gets report.md, stages.json and
stages.png. A marker per stage (OUT_DIR/.recipe/STAGE.json) records the command that made it: a
rerun skips done stages, resumes an interrupted training stage from its checkpoints, and redoes
an interrupted data or merge stage; `--force` redoes everything.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from crucible.atomic import write_text_atomic
from crucible.config import ConfigError, load_config
from crucible.posttrain.recipe_config import (
    ChatDataStage,
    DPOStage,
    MergeStage,
    PrefDataStage,
    Recipe,
    SFTStage,
    Stage,
    TrainStage,
    merge_models,
    read_recipe,
    substitute,
)

# Overrides the recipe sets itself, per kind (a stage may not set them).
OWNED = {
    "train": ("name", "out_dir", "checkpoint.init_from"),
    "sft": ("name", "out_dir", "sft.base"),
    "dpo": ("name", "out_dir", "dpo.init_from", "dpo.data"),
}
TRAIN_LIKE = (TrainStage, SFTStage, DPOStage)


@dataclass
class Plan:
    recipe: Recipe
    stages: list[Stage]
    label: str
    recipe_dir: Path
    out: Path
    dirs: dict[str, Path] = field(default_factory=dict)  # base and every stage -> its directory

    @property
    def state_dir(self) -> Path:
        return self.out / ".recipe"

    def marker(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def eval_models(self) -> list[str]:
        ev = self.recipe.eval
        if ev is None:
            return []
        if ev.stages is not None:
            return list(ev.stages)
        return [
            "base",
            *(s.name for s in self.stages if not isinstance(s, (ChatDataStage, PrefDataStage))),
        ]


def _where(plan: Plan, stage: Stage) -> str:
    return f"{plan.label}: stage {stage.name!r} ({stage.kind})"


# --------------------------------------------------------------------------- command lines


def _config_path(plan: Plan, config: str) -> str:
    """A config file beside the recipe, else the name as given (a path or a preset)."""
    beside = plan.recipe_dir / config
    return str(beside) if beside.is_file() else config


def _latest_checkpoint(run_dir: Path) -> Path | None:
    from crucible.train.checkpoint import latest_checkpoint

    ckpts = run_dir / "checkpoints"
    return latest_checkpoint(ckpts) if ckpts.is_dir() else None


def pairs_file(plan: Plan, dpo: DPOStage) -> Path:
    if dpo.data in plan.dirs:
        return plan.dirs[dpo.data] / "pairs.jsonl"
    return Path(substitute(dpo.data, plan.dirs))


def merge_docs(plan: Plan, stage: MergeStage) -> list[dict[str, Any]]:
    """The merge documents with stage names and ${NAME} replaced by directories."""
    docs = json.loads(json.dumps(stage.merges))
    names = {f: ref for f, ref in merge_models(stage)}
    for i, doc in enumerate(docs):

        def fix(ref: str, f: str) -> str:
            if names.get(f) == ref and ref in plan.dirs:
                return str(plan.dirs[ref])
            return substitute(ref, plan.dirs)

        if isinstance(doc.get("base_model"), str):
            doc["base_model"] = fix(doc["base_model"], f"merges[{i}].base_model")
        for j, m in enumerate(doc.get("models") or []):
            if isinstance(m, dict) and isinstance(m.get("model"), str):
                m["model"] = fix(m["model"], f"merges[{i}].models[{j}].model")
    return docs


def stage_argv(plan: Plan, stage: Stage, model_dirs: dict[str, Path] | None = None) -> list[str]:
    """The command line of a stage. `model_dirs` replaces inputs that do not exist yet (for
    validation: the model the chain starts from)."""
    dirs = {**plan.dirs, **(model_dirs or {})}
    out = plan.dirs[stage.name]
    threads = plan.recipe.threads
    if isinstance(stage, ChatDataStage):
        argv = ["chat-data", str(out), "--train", str(stage.train), "--test", str(stage.test),
                "--seed", str(stage.seed)]  # fmt: skip
        return argv + (["--tasks", stage.tasks] if stage.tasks else [])
    if isinstance(stage, PrefDataStage):
        argv = ["pref-data", str(out / "pairs.jsonl"), "--chosen-from", str(dirs[stage.input]),
                "--n", str(stage.n), "--samples", str(stage.samples), "--seed", str(stage.seed),
                "--max-new-tokens", str(stage.max_new_tokens),
                "--temperature", str(stage.temperature), "--verifier", stage.verifier]  # fmt: skip
        if stage.rejected_from:
            argv += ["--rejected-from", str(dirs[stage.rejected_from])]
        return argv + (["--think"] if stage.think else [])
    if isinstance(stage, MergeStage):
        return ["merge", str(plan.state_dir / f"{stage.name}.merge.yaml"), "--out", str(out)]
    assert isinstance(stage, TRAIN_LIKE)
    overrides = [substitute(o, plan.dirs) for o in stage.overrides]
    if threads and not any(o.startswith("train.threads=") for o in overrides):
        overrides.append(f"train.threads={threads}")
    overrides += [f"name={stage.name}", f"out_dir={plan.out}"]
    src = dirs[stage.input]
    if isinstance(stage, TrainStage):
        ckpt = _latest_checkpoint(src) if src.is_dir() else None
        overrides.append(f"checkpoint.init_from={ckpt or src / 'checkpoints' / 'LATEST'}")
    elif isinstance(stage, SFTStage):
        overrides.append(f"sft.base={src}")
    else:
        overrides += [f"dpo.init_from={src}", f"dpo.data=[{pairs_file(plan, stage)}]"]
    return [stage.kind, _config_path(plan, stage.config), *overrides]


def eval_argvs(plan: Plan, name: str) -> dict[str, list[str]]:
    """eval-chat and eval (tasks) command lines of one model, keyed by the results' suffix."""
    ev = plan.recipe.eval
    assert ev is not None
    model, out = str(plan.dirs[name]), plan.out / "eval"
    chat = [
        "eval-chat",
        model,
        "--data",
        substitute(ev.chat_data, plan.dirs),
        "--max-new-tokens",
        str(ev.max_new_tokens),
        "--out",
        str(out / f"{name}.chat.json"),
    ]
    chat += ["--limit", str(ev.limit)] if ev.limit else []
    chat += ["--threads", str(plan.recipe.threads)] if plan.recipe.threads else []
    argvs = {"chat": chat}
    if ev.tasks:
        tasks = ["eval", model, "--tasks", ev.tasks, "--out", str(out / f"{name}.tasks.json")]
        argvs["tasks"] = tasks + (["--limit", str(ev.task_limit)] if ev.task_limit else [])
    return argvs


# --------------------------------------------------------------------------- validation


def _parse(argv: list[str], where: str) -> Any:
    """The CLI's own parse of a stage's command line; a bad option is one line naming it."""
    import contextlib
    import io

    from crucible.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise ConfigError(f"{where}: {msg[-1] if msg else 'bad command line'}") from None


def _flat(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _owned(stage: Stage, where: str) -> None:
    for i, o in enumerate(getattr(stage, "overrides", [])):
        key = o.split("=", 1)[0].strip()
        if key in OWNED.get(stage.kind, ()):
            raise ConfigError(f"{where}: overrides[{i}]: {key} is set by the recipe (from the "
                              "stage's name, input and data)")  # fmt: skip


def _check_stage(plan: Plan, stage: Stage, start: dict[str, Path]) -> None:
    """Everything about one stage that can be checked before anything runs."""
    from crucible.posttrain.merge_config import parse_specs

    where = _where(plan, stage)
    _owned(stage, where)
    argv = stage_argv(plan, stage, start)
    try:
        if isinstance(stage, TRAIN_LIKE):
            cfg_src, overrides = argv[1], argv[2:]
            if isinstance(stage, SFTStage):
                from crucible.posttrain.sft_run import load_sft_config

                load_sft_config(cfg_src, overrides)
            else:
                cfg = load_config(cfg_src, overrides)
                if isinstance(stage, DPOStage):
                    _check_dpo_section(stage, cfg_src, cfg)
                if isinstance(stage, TrainStage):
                    if cfg.sft is not None or cfg.dpo is not None:
                        raise ConfigError(f"config: {cfg_src} is not a pretraining config")
                    _check_init_step(stage, cfg, start)
            missing = isinstance(stage, DPOStage) and stage.data not in plan.dirs
            if missing and not pairs_file(plan, stage).is_file():  # type: ignore[arg-type]
                raise ConfigError(f"data: {stage.data}: file not found")
        elif isinstance(stage, MergeStage):
            docs = merge_docs(plan, stage)
            parse_specs(docs, "merges")
            for f, ref in merge_models(stage):
                path = Path(substitute(ref, plan.dirs))
                if "/" in ref and not ref.startswith("${") and not path.exists():
                    raise ConfigError(f"{f}: {ref}: no such run, checkpoint or HF directory")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {_flat(e)}") from None
    _parse(argv, where)


def _check_dpo_section(stage: DPOStage, cfg_src: str, cfg: Any) -> None:
    """The config itself has the `dpo:` section (the recipe's own overrides would add one)."""
    from crucible.config import _read_yaml

    own = any(o.startswith("dpo.") for o in stage.overrides)
    if "dpo" not in _read_yaml(cfg_src)[0] and not own:
        raise ConfigError(f"config: {cfg_src} has no `dpo:` section")
    if cfg.sft is not None or cfg.grpo is not None or cfg.distill is not None:
        raise ConfigError(
            f"config: {cfg_src} is not a dpo config (it has another method's section)"
        )


def _check_init_step(stage: TrainStage, cfg: Any, start: dict[str, Path]) -> None:
    """The input's checkpoint must be before train.steps (when the input exists already)."""
    src = start.get(stage.input)
    ckpt = _latest_checkpoint(src) if src is not None and src.is_dir() else None
    if ckpt is None:
        return
    step = int(ckpt.name.rsplit("_", 1)[-1])
    if step >= cfg.train.steps:
        raise ConfigError(f"overrides: train.steps {cfg.train.steps} is not after the input's "
                          f"checkpoint step {step} ({ckpt}): nothing to train")  # fmt: skip


def load_plan(path: str | Path, out_dir: str | None = None) -> Plan:
    """Read and validate the whole recipe before anything runs."""
    from crucible.runs import run_config

    recipe, stages = read_recipe(path)
    label = str(path)
    out = Path(out_dir or recipe.out_dir or Path("runs") / recipe.name)
    plan = Plan(recipe, stages, label, Path(path).parent, out)
    base = Path(recipe.base)
    try:
        run_config(base)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{label}: base: {_flat(e)}") from None
    if _latest_checkpoint(base) is None:
        raise ConfigError(f"{label}: base: {base} has no complete checkpoint")
    plan.dirs["base"] = base
    for s in stages:
        plan.dirs[s.name] = out / s.name
    # A stage's input that does not exist yet is checked as the model its chain starts from.
    start: dict[str, Path] = {"base": base}
    for s in stages:
        if isinstance(s, TRAIN_LIKE):
            start[s.name] = plan.dirs[s.name] if plan.dirs[s.name].is_dir() else start[s.input]
        elif isinstance(s, MergeStage):
            first = merge_models(s)[0][1]
            start[s.name] = start.get(first, Path(substitute(first, plan.dirs)))
    for s in stages:
        _check_stage(plan, s, start)
    if recipe.eval is not None:
        chat = substitute(recipe.eval.chat_data, plan.dirs)
        if "${" not in recipe.eval.chat_data and not Path(chat).is_file():
            raise ConfigError(f"{label}: eval.chat_data: {chat}: file not found")
        for name in plan.eval_models():
            for argv in eval_argvs(plan, name).values():
                _parse(argv, f"{label}: eval")
        if recipe.eval.tasks:
            from crucible.evaluate.commands import _check_tasks

            argv = eval_argvs(plan, "base")["tasks"]
            try:
                _check_tasks(_parse(argv, f"{label}: eval"))
            except ConfigError as e:
                raise ConfigError(f"{label}: eval.tasks: {_flat(e)}") from None
    return plan


# --------------------------------------------------------------------------- running


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1))


def _clear(plan: Plan, name: str) -> None:
    """Remove a stage's directory to redo it: only one this recipe made (its marker exists)."""
    path = plan.dirs[name]
    if not path.exists():
        return
    if plan.marker(name).is_file():
        shutil.rmtree(path)
        return
    raise ConfigError(f"{plan.label}: stage {name!r}: {path} exists but was not made by this "
                      "recipe; move it away or choose another out_dir")  # fmt: skip


def call(argv: list[str]) -> int:
    """Run one crucible command line in this process, through the CLI's parser."""
    from crucible.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args) or 0


def _run(plan: Plan, what: str, argv: list[str]) -> float:
    print(f"\n== {what}: crucible {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    try:
        code = call(argv)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{what}: {e}") from e
    seconds = time.perf_counter() - t0
    if code:
        raise ConfigError(f"{what}: crucible {argv[0]} exited with status {code}")
    print(f"== {what}: done in {seconds:.1f} s", flush=True)
    return seconds


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_stage(plan: Plan, stage: Stage, force: bool) -> dict[str, Any]:
    """Run one stage unless it is done; return its marker."""
    mark = plan.marker(stage.name)
    old = _read_marker(mark)
    argv = stage_argv(plan, stage)
    what = f"stage {stage.name} ({stage.kind})"
    if old and old.get("status") == "done" and not force:
        if old.get("argv") != argv:
            raise ConfigError(
                f"{plan.label}: stage {stage.name!r}: done with another command "
                f"(crucible {' '.join(old.get('argv', []))}); pass --force to redo the recipe"
            )
        print(f"== {what}: done, skipped ({plan.dirs[stage.name]})", flush=True)
        return old
    out = plan.dirs[stage.name]
    if old and not force and isinstance(stage, TRAIN_LIKE) and (out / "summary.json").is_file():
        # stopped after the run finished (summary.json is written last), before the marker
        old = {**old, "status": "done", "finished": _now()}
        _write_marker(mark, old)
        print(f"== {what}: finished before the interruption ({out})", flush=True)
        return old
    resume = (
        old is not None and not force and isinstance(stage, TRAIN_LIKE)
        and _latest_checkpoint(out) is not None
    )  # fmt: skip
    if not resume:
        _clear(plan, stage.name)
    _write_marker(mark, {"status": "started", "kind": stage.kind, "argv": argv})
    if isinstance(stage, MergeStage):
        (plan.state_dir / f"{stage.name}.merge.yaml").write_text(
            yaml.safe_dump_all(merge_docs(plan, stage), sort_keys=False)
        )
    if isinstance(stage, PrefDataStage):
        out.mkdir(parents=True, exist_ok=True)
    seconds = _run(plan, what + (" (resumed)" if resume else ""), argv + (["--resume"] if resume
                                                                          else []))  # fmt: skip
    done = {"status": "done", "kind": stage.kind, "argv": argv, "seconds": round(seconds, 1),
            "finished": _now()}  # fmt: skip
    _write_marker(mark, done)
    return done


def run_evals(plan: Plan, markers: dict[str, dict[str, Any]], force: bool) -> None:
    """eval-chat and eval of every listed model; redone when the model's stage was redone."""
    for name in plan.eval_models():
        made = markers.get(name, {}).get("finished", "base")
        for kind, argv in eval_argvs(plan, name).items():
            mark = plan.marker(f"eval-{name}.{kind}")
            old = _read_marker(mark)
            result = Path(argv[argv.index("--out") + 1])
            if (not force and old and old.get("argv") == argv and old.get("model") == made
                    and result.is_file()):  # fmt: skip
                print(f"== eval {name} ({kind}): done, skipped ({result})", flush=True)
                continue
            seconds = _run(plan, f"eval {name} ({kind})", argv)
            _write_marker(mark, {"argv": argv, "model": made, "seconds": round(seconds, 1)})


def run_recipe(path: str | Path, force: bool = False, out_dir: str | None = None,
               dry_run: bool = False) -> Path:  # fmt: skip
    """Validate the recipe, run its stages and evaluations, write the report; OUT_DIR."""
    plan = load_plan(path, out_dir)
    if dry_run:
        for s in plan.stages:
            print(f"{s.name} ({s.kind}): crucible {' '.join(stage_argv(plan, s))}")
        for name in plan.eval_models():
            for argv in eval_argvs(plan, name).values():
                print(f"eval {name}: crucible {' '.join(argv)}")
        return plan.out
    if plan.recipe.threads:
        import torch

        torch.set_num_threads(plan.recipe.threads)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.state_dir).mkdir(exist_ok=True)
    shutil.copyfile(path, plan.state_dir / "recipe.yaml")
    t0 = time.perf_counter()
    markers = {s.name: run_stage(plan, s, force) for s in plan.stages}
    run_evals(plan, markers, force)
    from crucible.posttrain.recipe_report import write_report

    files = write_report(plan, markers)
    print(f"\nrecipe {plan.recipe.name}: {len(plan.stages)} stages in "
          f"{time.perf_counter() - t0:.0f} s; wrote {', '.join(str(f) for f in files)}")  # fmt: skip
    sys.stdout.flush()
    return plan.out
