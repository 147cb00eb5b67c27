"""`crucible sft`: supervised fine-tuning on conversations, on the pretraining loop.

An SFT run is an ordinary run (`crucible.train.trainer.train`) with other inputs: the model starts
from a base (a run directory, a checkpoint, or a Hugging Face directory), the loader is the
`SFTLoader` over chat-templated conversations, the objective is the SFT loss, and validation is
the loss on held-out conversations. Checkpoints, metrics, spike handling, resume, in-loop
evaluation and DDP/FSDP are the loop's own. The run directory also gets the chat template
(``chat_template.jinja``), which `crucible export`, `crucible chat` and `crucible serve` use.

The model section comes from the base: keys set under ``model:`` override it, but only
``max_seq_len``, ``doc_masking``, ``z_loss`` and ``init_std`` may differ from the base (RoPE has
no learned table, so the context can grow). With packing, ``doc_masking`` defaults to true, and
``max_seq_len`` is raised to ``train.seq_len`` when it is shorter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from crucible.config import (
    ConfigError,
    RunConfig,
    _read_yaml,
    apply_override,
    format_validation_error,
)
from crucible.evaluate.inloop import InLoopEvalCallback, eval_interval
from crucible.posttrain.chat_template import ChatEncoder, ChatTemplate, write_chat_template
from crucible.posttrain.sft_data import Example, SFTLoader, SFTStats, tokenize_conversations
from crucible.posttrain.sft_loss import sft_loss
from crucible.posttrain.sft_prepare import SFTData, load_sft_data
from crucible.tokenizer.train import PAD_TOKEN, load_tokenizer
from crucible.train.callbacks.base import Callback
from crucible.train.setup import TrainInputs
from crucible.train.state import Run
from crucible.train.step import Loss

# Model settings an SFT run may change relative to its base (they change no weight's shape).
MAY_CHANGE = ("max_seq_len", "doc_masking", "z_loss", "init_std", "zero_init_residual")


# --------------------------------------------------------------------------- the base model


@dataclass
class Base:
    """Where an SFT run starts: a model config, its weights, and its tokenizer."""

    kind: str  # "run", "checkpoint" or "hf"
    path: Path
    model: dict[str, Any]  # ModelConfig fields
    tokenizer: Path
    checkpoint: Path | None = None  # run / checkpoint bases

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the base weights into `model` (a Transformer of the same shapes)."""
        if self.kind == "hf":
            from crucible.model.hf import load_hf

            state = load_hf(self.path).state_dict()
            model.load_state_dict(state, strict=True)
        else:
            from crucible.train.checkpoint import load_model_weights

            load_model_weights(self.checkpoint, model)  # type: ignore[arg-type]


def resolve_base(spec: str) -> Base:
    """A run directory, a checkpoint directory or a Hugging Face directory, checked."""
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"sft.base {spec}: no such directory")
    if (path / "state.json").is_file():  # .../checkpoints/step_N
        run_dir = path.parent.parent
        from crucible.runs import resolve_checkpoint, run_config

        cfg = run_config(run_dir)
        ckpt = resolve_checkpoint(run_dir, str(path))
        return Base("checkpoint", path, cfg.model.model_dump(), run_dir / "tokenizer.json", ckpt)
    if (path / "config.yaml").is_file():
        from crucible.runs import resolve_checkpoint, run_config

        cfg = run_config(path)
        ckpt = resolve_checkpoint(path)
        return Base("run", path, cfg.model.model_dump(), path / "tokenizer.json", ckpt)
    if (path / "config.json").is_file():
        from crucible.model.hf import model_config_from_hf

        try:
            mcfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"sft.base {spec}: unsupported config.json: {e}") from None
        tok = path / "tokenizer.json"
        if not tok.is_file():
            raise ConfigError(f"sft.base {spec}: no tokenizer.json beside the model")
        return Base("hf", path, mcfg.model_dump(), tok)
    raise ConfigError(
        f"sft.base {spec}: not a run directory (config.yaml), a checkpoint (state.json) or a "
        "Hugging Face directory (config.json)"
    )


def load_sft_config(source: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run config of an SFT run: the file, the overrides, and the base's model section."""
    data, label = _read_yaml(source)
    for o in overrides or []:
        apply_override(data, o)
    if overrides:
        label += f" (with overrides {' '.join(overrides)})"
    sft = data.get("sft")
    if not isinstance(sft, dict):
        raise ConfigError(f"{label}: an SFT config needs an `sft:` section (see `crucible sft -h`)")
    given = dict(data.get("model") or {})
    base = resolve_base(str(sft["base"])) if sft.get("base") else None
    model = dict(base.model) if base else {}
    model.update(given)
    train = data.get("train") or {}
    packing = sft.get("packing", "bfd")
    if packing == "bfd" and "doc_masking" not in given:
        model["doc_masking"] = True
    seq_len = train.get("seq_len")
    if isinstance(seq_len, int) and "max_seq_len" not in given:
        model["max_seq_len"] = max(int(model.get("max_seq_len", 0) or 0), seq_len)
    data["model"] = model
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, label)) from None
    if base is not None:
        changed = [
            f"model.{k} {base.model[k]!r} -> {v!r}"
            for k, v in cfg.model.model_dump().items()
            if k not in MAY_CHANGE and base.model.get(k) != v
        ]
        if changed:
            raise ConfigError(
                f"{label}: sft.base {base.path} has another shape ({'; '.join(changed)}); an SFT "
                f"run keeps the base's model and may change only {', '.join(MAY_CHANGE)}"
            )
    if cfg.sft is not None and cfg.sft.packing == "bfd" and not cfg.model.doc_masking:
        raise ConfigError(
            f"{label}: sft.packing bfd needs model.doc_masking=true (packed conversations would "
            "attend to each other); set it, or sft.packing=none"
        )
    if base is None and cfg.data.tokenizer is None:
        raise ConfigError(f"{label}: sft.base is unset: give data.tokenizer for a fresh model")
    return cfg


# --------------------------------------------------------------------------- data


@dataclass
class SFTInputs:
    train: list[Example]
    val: list[Example]
    train_stats: SFTStats
    val_stats: SFTStats | None
    summary: str
    broken: int  # records of the files that failed validation (named in the summary)
    pad_id: int
    template: ChatTemplate
    tokenizer_path: Path


def _synthetic(
    split: str, n: int, cfg: Any, encoder: ChatEncoder, seq_len: int
) -> tuple[list[Example], SFTStats]:
    from crucible.posttrain.synthetic import generate

    convs = generate(split, n, seed=cfg.synthetic_seed, tasks=cfg.synthetic_tasks)  # type: ignore[arg-type]
    return tokenize_conversations(
        convs, encoder, loss=cfg.loss, max_tokens=seq_len + 1, truncation=cfg.truncation,
        template_kwargs=cfg.template_kwargs,
    )  # fmt: skip


def prepare_sft_inputs(cfg: RunConfig) -> SFTInputs:
    """Read, render, tokenize and label the train and val conversations (ConfigError if none)."""
    sft = cfg.sft
    assert sft is not None
    base = resolve_base(sft.base) if sft.base else None
    tok_path = base.tokenizer if base else Path(str(cfg.data.tokenizer))
    if not tok_path.is_file():
        raise ConfigError(f"{tok_path}: tokenizer not found")
    tokenizer = load_tokenizer(tok_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"{tok_path}: {vocab} tokens do not fit model.vocab_size {cfg.model.vocab_size}"
        )
    template = ChatTemplate.from_file(sft.template) if sft.template else ChatTemplate.default()
    seq_len = cfg.train.seq_len
    common = dict(
        seq_len=seq_len, loss=sft.loss, truncation=sft.truncation, template=template,
        template_kwargs=sft.template_kwargs, split=sft.split,
    )  # fmt: skip

    def from_files(paths: list[str], what: str) -> SFTData:
        try:
            return load_sft_data(paths, tokenizer, **common)  # type: ignore[arg-type]
        except ConfigError as e:
            raise ConfigError(f"sft.{what}: {e}") from None

    if sft.train_data:
        train = from_files(sft.train_data, "train_data")
        encoder, train_ex, train_stats = train.encoder, train.examples, train.stats
        lines = [f"train: {train.summary()}"]
        broken = sum(len(r.issues) for r in train.reads)
    else:
        encoder = ChatEncoder(template, tokenizer)
        train_ex, train_stats = _synthetic("train", sft.synthetic_train, sft, encoder, seq_len)
        lines = [f"train (synthetic, seed {sft.synthetic_seed}): {train_stats.summary()}"]
        broken = 0
        if not train_ex:
            raise ConfigError(f"sft: no usable synthetic examples:\n{lines[0]}")
    val_ex: list[Example] = []
    val_stats = None
    if sft.val_data:
        val = from_files(sft.val_data, "val_data")
        val_ex, val_stats = val.examples, val.stats
        lines.append(f"val: {val.summary()}")
    elif not sft.train_data:
        val_ex, val_stats = _synthetic("test", sft.synthetic_val, sft, encoder, seq_len)
        lines.append(f"val (synthetic test split): {val_stats.summary()}")
    pad = tokenizer.token_to_id(PAD_TOKEN)
    pad_id = int(pad) if pad is not None else encoder.end_of_turn_id
    return SFTInputs(train_ex, val_ex, train_stats, val_stats, "\n".join(lines), broken,
                     pad_id, template, tok_path)  # fmt: skip


# --------------------------------------------------------------------------- objective, report


def sft_objective(run: Run, batch: Any) -> Loss:
    """The SFT loss of one micro-batch, weighted so that the optimizer step is the mean over every
    supervised target of the global batch (however it is split over micro-batches and ranks).

    `train_step` divides by the gradient-accumulation steps; `sft_loss` with
    ``normalizer = step_supervised / world_size`` already sums to the step's mean over the
    micro-batches, so the objective multiplies that division back out.
    """
    world = run.info.world_size
    loss = sft_loss(run.model, batch, normalizer=batch.step_supervised / world)
    scaled = loss * run.grad_accum
    supervised = batch.targets.new_tensor(batch.num_supervised, dtype=torch.float64)
    positions = batch.targets.numel()
    return Loss(
        scaled,
        {"loss": scaled.detach(), "supervised_share": supervised / positions},
    )


class SFTReport(Callback):
    """At the start: the data report (console and a `sft_data` event in metrics.jsonl)."""

    def __init__(self, inputs: SFTInputs) -> None:
        self.inputs = inputs

    def on_train_start(self, run: Run) -> None:
        inp, loader = self.inputs, run.loader
        st, ls = inp.train_stats, loader.stats()
        values: dict[str, Any] = {
            "records": st.records,
            "examples": st.examples,
            "tokens": st.tokens,
            "supervised": st.supervised,
            "supervised_share": st.supervised_share,
            "truncated": st.truncated,
            "dropped_too_long": st.too_long,
            "broken_records": inp.broken,
            "left_out": len(st.issues) - st.too_long,
            "rows": ls["rows"],
            "packing": loader.packing,
            "fill": ls["fill"],
            "epochs": run.cfg.train.steps / loader.steps_per_epoch,
        }
        if inp.val_stats is not None:
            values.update(
                val_examples=inp.val_stats.examples,
                val_truncated=inp.val_stats.truncated,
                val_dropped_too_long=inp.val_stats.too_long,
            )
        run.log("sft_data", run.step, **values)
        run.say(inp.summary)
        run.say(
            f"sft: {ls['rows']} {'packed' if loader.packing else 'padded'} rows of "
            f"{loader.seq_len} ({ls['fill']:.1%} filled), {st.supervised_share:.1%} of tokens "
            f"supervised, {values['epochs']:.2f} epochs in {run.cfg.train.steps} steps"
        )


def make_train_inputs(cfg: RunConfig, inputs: SFTInputs) -> TrainInputs:
    sft = cfg.sft
    assert sft is not None
    t = cfg.train
    base = resolve_base(sft.base) if sft.base else None

    def loader(rank: int, world: int) -> SFTLoader:
        return SFTLoader(
            inputs.train, t.seq_len, t.global_batch_size, t.micro_batch_size,
            pad_id=inputs.pad_id, packing=sft.packing == "bfd", rank=rank, world_size=world,
            seed=cfg.seed,
        )  # fmt: skip

    def val_batches(rank: int, world: int) -> list:
        if not inputs.val:
            return []
        per_step = t.micro_batch_size * world
        v = SFTLoader(
            inputs.val, t.seq_len, per_step, t.micro_batch_size, pad_id=inputs.pad_id,
            packing=sft.packing == "bfd", rank=rank, world_size=world, shuffle=False,
        )  # fmt: skip
        steps = min(t.val_batches, max(1, math.floor(v.n_rows / per_step)))
        return [b for s in range(steps) for b in v.step_batches(s)]

    def write_files(run_dir: Path) -> None:
        write_chat_template(run_dir, inputs.template)

    return TrainInputs(
        tokenizer_path=inputs.tokenizer_path,
        make_loader=loader,
        val_batches=val_batches,
        objective=sft_objective,
        init_model=base.load_into if base else None,
        write_files=write_files,
    )


def run_sft(cfg: RunConfig, resume: bool = False, quiet: bool = False, callbacks=()):  # type: ignore[no-untyped-def]
    """Train an SFT run; returns the trainer's TrainResult."""
    from crucible.train.trainer import train

    if cfg.sft is None:
        raise ConfigError("the config has no `sft:` section")
    inputs = prepare_sft_inputs(cfg)
    extra = list(callbacks)
    if eval_interval(cfg.eval, cfg.train.tokens_per_step):
        extra.append(InLoopEvalCallback())
    return train(
        cfg, resume=resume, quiet=quiet, callbacks=[SFTReport(inputs), *extra],
        inputs=make_train_inputs(cfg, inputs),
    )  # fmt: skip
