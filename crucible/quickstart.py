"""The main job: tokenizer -> shards -> pretrain `tiny-speedrun` -> validation bpb -> samples -> HF export.

Runs on 2 CPU cores in a few minutes with no network, on the embedded standard-library corpus.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from crucible.config import ConfigError, load_config
from crucible.evaluate.code_shape import PythonShape, cut_function, shape_summary
from crucible.model import export_hf, generate_text
from crucible.pretrain import run_pretraining
from crucible.report.plots import plot_loss_curve
from crucible.report.run_report import write_run_report
from crucible.runs import load_run_model
from crucible.tokenizer.train import eos_id, load_tokenizer
from crucible.train.metrics import console, format_duration

# The winning CPU recipe (tiny + Muon + zero-init + LR 1e-2): see the preset file for the
# measurements behind it.
QUICKSTART_PRESET = "tiny-speedrun"
# Three functions sampled from "def " at the start of a line, each cut where its body ends. The
# prompt is "\ndef ": in the corpus `def` follows a newline, and alone at position 0 the model
# reads it as any word (35% of samples opened with a proper `def name(`, 85% after a newline:
# docs/results/quickstart-samples-2026-12-02/prompt-prefix.txt). Temperature, nucleus and budget
# were measured over 60-100 samples per setting (docs/evaluation.md, "Samples").
SAMPLE_PROMPT, NUM_SAMPLES = "\ndef ", 3
SAMPLE_TEMPERATURE, SAMPLE_TOP_P, SAMPLE_MAX_TOKENS = 0.8, 0.9, 160
MARKER = ".crucible-quickstart"


def sample_functions(
    model, tokenizer, n: int = NUM_SAMPLES, seed: int = 0, **sampling
) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs from `def `, each continuation cut at the function's end."""
    gen = torch.Generator().manual_seed(seed)
    opts = dict(temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, generator=gen) | sampling
    eos, shown = eos_id(tokenizer), SAMPLE_PROMPT.lstrip("\n")
    budget = opts.pop("max_new_tokens", SAMPLE_MAX_TOKENS)
    out = []
    for _ in range(n):
        text = shown + generate_text(model, tokenizer, SAMPLE_PROMPT, budget, eos, **opts)
        out.append((shown, cut_function(text)[len(shown) :]))
    return out


def check_hf_export(ours: torch.nn.Module, hf_dir: Path) -> float:
    """Reload the export with transformers and return the max |logit difference| vs ours."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (1, min(64, ours.cfg.max_seq_len)))
    with torch.no_grad():
        return float((ours(ids).logits - theirs(ids).logits).abs().max())


def _check_replaceable(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / MARKER).is_file():
        raise ConfigError(
            f"{run_dir} exists and was not made by the quickstart: choose another --out-dir "
            "(nothing was deleted)"
        )


def _fresh_run_dir(run_dir: Path) -> Path | None:
    """An empty, marked run directory; a previous quickstart run is moved aside (returned) so
    that a rerun that fails can put it back (`_restore`)."""
    if run_dir.exists() and any(run_dir.iterdir()):
        # The quickstart run is a demo, started afresh each time, but only a directory the
        # quickstart made itself (it leaves a marker) is ever deleted.
        if not (run_dir / MARKER).is_file():
            raise ConfigError(
                f"{run_dir} exists and was not made by the quickstart: choose another name= "
                "or --out-dir (nothing was deleted)"
            )
        # Kept aside until the new run has trained: a rerun that fails restores it.
        previous = run_dir.with_name(f".{run_dir.name}.previous-{os.getpid()}")
        run_dir.rename(previous)
    else:
        previous = None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("made by crucible quickstart; rerunning it replaces this run\n")
    return previous


def _restore(run_dir: Path, previous: Path | None, failed: bool) -> None:
    """After a rerun: drop the previous run if it succeeded, put it back if it failed."""
    if previous is None:
        return
    if failed:
        shutil.rmtree(run_dir, ignore_errors=True)  # the failed rerun, made just now
        previous.rename(run_dir)
    else:
        shutil.rmtree(previous, ignore_errors=True)


def quickstart(
    overrides: list[str] | None = None,
    out_dir: str = "runs",
    chat: bool = False,
    chat_overrides: list[str] | None = None,
) -> Path:
    """The main job; with `chat`, then SFT of the result (preset sft-tiny plus
    `chat_overrides`) and a short chat demo."""
    t0 = time.perf_counter()
    run_dir = _quickstart_base(overrides, out_dir, chat)
    if chat:
        from crucible.posttrain.quickstart_chat import quickstart_chat

        console.rule("[bold]7. chat: SFT on the synthetic chat data, then a short demo")
        chat_dir = Path(out_dir) / "quickstart-chat"
        previous = _fresh_run_dir(chat_dir)
        try:
            quickstart_chat(run_dir, chat_dir, chat_overrides)
        except BaseException:
            _restore(chat_dir, previous, failed=True)
            raise
        _restore(chat_dir, previous, failed=False)
        console.print(
            f"base + SFT + demo in {format_duration(time.perf_counter() - t0)}\n"
            f"next: crucible chat {chat_dir}   (or crucible serve {chat_dir})"
        )
        return chat_dir
    return run_dir


def _quickstart_base(overrides: list[str] | None, out_dir: str, chat: bool) -> Path:
    t0 = time.perf_counter()
    # In-loop evaluation on the built-in early-signal tasks at each validation step.
    base = ["name=quickstart", f"out_dir={out_dir}", "eval.every=100"]
    cfg = load_config(QUICKSTART_PRESET, [*base, *(overrides or [])])
    run_dir = cfg.run_dir
    if chat:  # fail before the base trains, not after
        _check_replaceable(Path(out_dir) / "quickstart-chat")
    previous = _fresh_run_dir(run_dir)
    console.rule("[bold]1-4. tokenizer, shards, pretraining, validation")
    try:
        result = run_pretraining(cfg)
    except BaseException:
        _restore(run_dir, previous, failed=True)
        raise
    _restore(run_dir, previous, failed=False)
    console.rule("[bold]5. samples (KV-cache generation)")
    model, _, _ = load_run_model(run_dir)  # the final checkpoint, read back as a user would
    samples = sample_functions(model, load_tokenizer(result.tokenizer_path))
    for i, (prompt, text) in enumerate(samples, 1):
        console.print(f"[bold]sample {i}[/]", highlight=False)
        console.print(prompt + text, markup=False, highlight=False)
    shapes = [PythonShape.of(p + t) for p, t in samples]
    console.print(f"Python shape of the samples: {shape_summary(shapes)}")
    console.rule("[bold]6. Hugging Face export, reloaded by transformers")
    hf_dir = export_hf(model, run_dir / "hf", tokenizer_path=str(result.tokenizer_path))
    diff = check_hf_export(model, hf_dir)
    console.print(f"transformers reloaded {hf_dir}: max |logit difference| {diff:.2e}")
    plot = plot_loss_curve(run_dir)
    md, html = write_run_report(
        run_dir,
        samples,
        extra={
            "samples' Python shape": shape_summary(shapes),
            "HF export max logit difference vs ours": f"{diff:.2e}",
        },
    )
    val = result.val or {}
    console.rule("[bold]done")
    console.print(
        f"validation loss {val.get('val_loss', float('nan')):.4f}, "
        f"bits-per-byte {val.get('val_bpb', float('nan')):.4f}, "
        f"in {format_duration(time.perf_counter() - t0)}\n"
        f"  run directory   {run_dir}\n"
        f"  resolved config {run_dir / 'config.yaml'}\n"
        f"  metrics         {run_dir / 'metrics.jsonl'}\n"
        f"  checkpoint      {result.checkpoint}\n"
        f"  loss curve      {plot}\n"
        f"  report          {md} , {html}\n"
        f"  HF export       {hf_dir}\n"
        + ("" if chat else f"next: crucible generate {run_dir} --prompt 'def '")
    )
    return run_dir
