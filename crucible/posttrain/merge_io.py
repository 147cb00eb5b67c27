"""Read merge inputs (Crucible runs and checkpoints, Hugging Face directories), check that they fit
together, and write the result as a Crucible run directory (and optionally an HF export).

Output layout (what `crucible generate`, `eval` and `export` read):
    OUT/config.yaml                        the base (or first) model's run config, renamed
    OUT/tokenizer.json                     the inputs' (identical) tokenizer
    OUT/checkpoints/step_000000/model.safetensors + state.json (step 0, the merge recipe)
    OUT/merge.yaml                         the merge config that made it
    OUT/hf/                                with --hf: a transformers-loadable export
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from crucible.config import ConfigError, ModelConfig, RunConfig, TrainConfig, dump_config
from crucible.train.checkpoint import save_weights_checkpoint


@dataclass
class Source:
    label: str  # as written in the config
    state: dict[str, Tensor]
    model_cfg: ModelConfig
    run_cfg: RunConfig | None  # None for an HF directory
    tokenizer: Path | None


def _resolve_path(ref: str, config_dir: Path | None) -> Path:
    p = Path(ref).expanduser()
    if p.exists() or p.is_absolute() or config_dir is None:
        return p
    alt = config_dir / p
    return alt if alt.exists() else p


def load_source(ref: str, config_dir: Path | None = None) -> Source:
    """A run directory (latest checkpoint), a checkpoint directory, or an HF model directory."""
    from crucible.runs import load_run_model

    path = _resolve_path(ref, config_dir)
    if (path / "state.json").is_file() and not (path / "config.yaml").is_file():
        run_dir, ckpt = path.resolve().parent.parent, str(path.resolve())
    else:
        run_dir, ckpt = path, None
    if (run_dir / "config.yaml").is_file():
        model, cfg, _ = load_run_model(run_dir, ckpt)
        tok = run_dir / "tokenizer.json"
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return Source(ref, state, cfg.model, cfg, tok if tok.is_file() else None)
    if (path / "config.json").is_file():
        from crucible.model.hf import load_hf

        try:
            model = load_hf(path, dtype=None)
        except ValueError as e:
            raise ConfigError(f"model {ref}: {e}") from None
        tok = path / "tokenizer.json"
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return Source(ref, state, model.cfg, None, tok if tok.is_file() else None)
    raise ConfigError(
        f"model {ref}: not a run directory (config.yaml), a checkpoint (state.json) or a "
        "Hugging Face model directory (config.json)"
    )


def _vocab(path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ConfigError(f"{path}: unreadable tokenizer ({e})") from None


def _architecture(cfg: ModelConfig) -> dict[str, Any]:
    """What must agree for tensors to mean the same thing (shapes are compared separately)."""
    return {
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "rope_theta": cfg.rope_theta,
        "rope layers": [i for i in range(cfg.num_layers) if cfg.uses_rope(i)],
        "qk_norm": cfg.qk_norm,
        "norm_eps": cfg.norm_eps,
    }


def check_compatible(sources: list[Source]) -> None:
    """Same tensor names and shapes, architecture and tokenizer; else one line naming the first
    mismatch (the output takes the first model's remaining settings, e.g. max_seq_len)."""
    ref = sources[0]
    for other in sources[1:]:
        for name, t in ref.state.items():
            if name not in other.state:
                raise ConfigError(f"models {ref.label} and {other.label} differ: {other.label} "
                                  f"has no tensor {name}")  # fmt: skip
            if tuple(other.state[name].shape) != tuple(t.shape):
                raise ConfigError(
                    f"models {ref.label} and {other.label} differ at tensor {name}: shape "
                    f"{list(t.shape)} vs {list(other.state[name].shape)}"
                )
        extra = [n for n in other.state if n not in ref.state]
        if extra:
            raise ConfigError(f"models {ref.label} and {other.label} differ: {ref.label} has no "
                              f"tensor {extra[0]}")  # fmt: skip
        a, b = _architecture(ref.model_cfg), _architecture(other.model_cfg)
        for key in a:
            if a[key] != b[key]:
                raise ConfigError(f"models {ref.label} and {other.label} differ in architecture: "
                                  f"{key} {a[key]} vs {b[key]}")  # fmt: skip
    with_tok = [s for s in sources if s.tokenizer is not None]
    if len(with_tok) < 2:
        return
    first = _vocab(with_tok[0].tokenizer)  # type: ignore[arg-type]
    for other in with_tok[1:]:
        vocab = _vocab(other.tokenizer)  # type: ignore[arg-type]
        if vocab == first:
            continue
        by_id = {i: tok for tok, i in vocab.items()}
        for tok, i in sorted(first.items(), key=lambda kv: kv[1]):
            if by_id.get(i) != tok:
                raise ConfigError(
                    f"models {with_tok[0].label} and {other.label} have different tokenizers: "
                    f"token id {i} is {tok!r} in one and {by_id.get(i)!r} in the other"
                )
        raise ConfigError(
            f"models {with_tok[0].label} and {other.label} have different tokenizers "
            f"({len(first)} vs {len(vocab)} tokens)"
        )


def _run_config(template: Source, name: str) -> RunConfig:
    if template.run_cfg is not None:
        return template.run_cfg.model_copy(update={"name": name})
    mc = template.model_cfg
    seq = min(TrainConfig().seq_len, mc.max_seq_len)
    return RunConfig(name=name, model=mc, train=TrainConfig(seq_len=seq))


def check_output(out: Path, overwrite: bool) -> None:
    """--overwrite replaces only a previous merge (a directory with merge.yaml), never a run."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if not (out.exists() and any(out.iterdir())):
        return
    if not overwrite:
        raise ConfigError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    if not (out / "merge.yaml").is_file():
        raise ConfigError(
            f"--out {out}: not a previous merge (no merge.yaml); --overwrite only replaces "
            "merges, choose a new directory (nothing was deleted)"
        )


def write_run(
    out: Path,
    state: dict[str, Tensor],
    template: Source,
    merge_yaml: str,
    recipe: dict[str, Any],
    hf: bool = False,
) -> Path:
    """Write the merged model as a run directory, atomically (built aside, then renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = _run_config(template, out.name)
        (tmp / "config.yaml").write_text(dump_config(cfg))
        if template.tokenizer is not None:
            shutil.copyfile(template.tokenizer, tmp / "tokenizer.json")
        meta = {"step": 0, "tokens_seen": None, "merge": recipe}
        save_weights_checkpoint(tmp / "checkpoints" / "step_000000", state, meta)
        (tmp / "merge.yaml").write_text(merge_yaml)
        if hf:
            from crucible.model import Transformer
            from crucible.model.hf import export_hf

            with torch.device("meta"):
                model = Transformer(cfg.model)
            model.load_state_dict(state, assign=True)
            model.init_buffers()
            tok = tmp / "tokenizer.json"
            export_hf(model, tmp / "hf", tokenizer_path=tok if tok.is_file() else None)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def dump_specs(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)
