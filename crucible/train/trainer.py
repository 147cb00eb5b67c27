"""The pretraining loop, in one place, top to bottom.

    preflight (config, data, output dir) -> model -> DDP/FSDP2 -> optimizer -> loader
    -> [resume] -> for each step: micro-batches, clip, step, log, validate, checkpoint
    -> summary.json (the mark of a finished run)

The same function runs in one process or under `torchrun`; distribution is a wrapper around the
model and a rank-aware loader, nothing inside the loop.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from crucible.config import ConfigError, RunConfig, dump_config
from crucible.data.loader import PretrainLoader, eval_batches
from crucible.data.mixture import MixtureLoader, Stage
from crucible.data.prepare import PreparedData, prepare_data
from crucible.data.shards import ShardSet
from crucible.model import Transformer
from crucible.model.moe import update_router_bias
from crucible.plan.flops import train_flops_per_token
from crucible.plan.params import count_params
from crucible.tokenizer.train import EOS_TOKEN, load_tokenizer, token_byte_lengths
from crucible.train import checkpoint as ckpt
from crucible.train.distributed import (
    all_reduce_sum,
    barrier,
    init_distributed,
    sync_grads_context,
    wrap_model,
)
from crucible.train.metrics import MetricsLogger, console, format_duration, peak_flops
from crucible.train.optim import build_optimizer
from crucible.train.schedule import lr_at
from crucible.train.validation import evaluate_loss


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val: dict[str, float] | None
    checkpoint: Path | None
    tokenizer_path: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware does bf16 natively; None means plain fp32."""
    if setting == "fp32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def make_loader(
    cfg: RunConfig, data: PreparedData, rank: int, world: int, eos: int | None
) -> PretrainLoader | MixtureLoader:
    """One shard set, or a staged mixture of named sources (data.sources + data.stages)."""
    common = dict(
        seq_len=cfg.train.seq_len,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        eos_id=eos,
    )
    if data.sources:
        stages = [Stage(s.name, s.weights, s.steps) for s in cfg.data.stages]
        sources = {name: ShardSet(path) for name, path in data.sources.items()}
        return MixtureLoader(sources, stages, **common)
    return PretrainLoader(ShardSet(data.train_dir), **common)


def compile_model(model: torch.nn.Module, per_block: bool = False) -> None:
    """torch.compile in place (state-dict names unchanged).

    The whole model compiles into one graph, loss included, which fuses best. FSDP2 shards each
    block separately, so there every block is compiled on its own (as torchtitan does).
    """
    if per_block:
        for block in model.layers:
            block.compile()
    else:
        model.compile()


def check_output_dir(run_dir: Path, resume: bool) -> None:
    """Fail before any work when the run directory cannot be written or would be clobbered."""
    parent = run_dir.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {parent}: not writable (checked {probe})")
    if run_dir.exists() and not resume and any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already exists: pass --resume to continue it, "
            "or choose another name= / out_dir="
        )


def train(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    device = resolve_device(cfg.train.device)
    info = init_distributed(cfg.distributed, device.type)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    say = console.print if (info.is_main and not quiet) else (lambda *a, **k: None)
    run_dir = cfg.run_dir

    # ---- preflight: everything that can be wrong is checked before the run directory exists
    check_output_dir(run_dir, resume)  # every rank, before anyone creates the directory
    barrier()
    micro, world = cfg.train.micro_batch_size, info.world_size
    if cfg.train.global_batch_size % (micro * world):
        raise ConfigError(
            f"train.global_batch_size {cfg.train.global_batch_size} is not divisible by "
            f"micro_batch_size {micro} x {world} process(es)"
        )
    grad_accum = cfg.train.global_batch_size // (micro * world)
    # The last step this invocation trains: train.stop_at ends early (a trunk to fork from).
    end_step = cfg.train.stop_at or cfg.train.steps
    init_from = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None
    if init_from is not None:
        try:
            init_step = ckpt.check_init_from(init_from, world)["step"]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if init_step >= end_step:
            raise ConfigError(
                f"checkpoint.init_from {init_from} is at step {init_step}; this run stops at "
                f"step {end_step}: nothing to train"
            )
    if info.is_main:
        data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
    barrier()
    if not info.is_main:
        data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
    # prepare_data has checked the shards against the tokenizer and the tokenizer against the model
    val_shards = ShardSet(data.val_dir)
    tokenizer = load_tokenizer(data.tokenizer_path)
    token_bytes = torch.from_numpy(token_byte_lengths(tokenizer)).long()
    if token_bytes.numel() < cfg.model.vocab_size:  # pad rows the tokenizer never produces
        token_bytes = torch.cat(
            [token_bytes, torch.zeros(cfg.model.vocab_size - token_bytes.numel(), dtype=torch.long)]
        )
    eos = tokenizer.token_to_id(EOS_TOKEN)  # None: the shards' metadata names it

    # ---- the run directory
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").unlink(missing_ok=True)  # the run is unfinished from now on
        (run_dir / "stopped.json").unlink(missing_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(dump_config(cfg))
        tmp.replace(run_dir / "config.yaml")
        shutil.copyfile(data.tokenizer_path, run_dir / "tokenizer.json")
    barrier()

    # ---- model, wrapper, optimizer, loader
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialise in place: no full-size CPU copy of a large model
        model = Transformer(cfg.model)
    if cfg.train.compile:
        compile_model(model, per_block=info.enabled and cfg.distributed.strategy == "fsdp")
    model = wrap_model(model, info, cfg.distributed, device)
    optimizer = build_optimizer(model, cfg.optim, device)
    loader = make_loader(cfg, data, info.rank, world, eos)
    val_batches = eval_batches(
        val_shards, cfg.train.seq_len, micro, cfg.train.val_batches, info.rank, world, eos_id=eos
    )
    amp = autocast_dtype(cfg.train.dtype, device)
    metrics = (
        MetricsLogger(
            run_dir, cfg.train.tensorboard, cfg.train.wandb_project, cfg.model_dump(mode="json")
        )
        if info.is_main
        else None
    )

    start_step = 0
    checkpoints = run_dir / "checkpoints"
    latest = ckpt.latest_checkpoint(checkpoints) if resume else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer)
        loader.load_state_dict(state["loader"])
        start_step = state["step"]
        if metrics:
            metrics.truncate_after(start_step)
            metrics.log("resume", start_step, checkpoint=latest.name)
        say(f"[bold]resumed[/] from {latest} at step {start_step}")
    elif init_from is not None:
        # Weights, optimizer and RNG of another run; the data position is this run's own loader
        # at that step (a pure function of the step), so the data config may differ.
        # Hyperparameters (betas, weight decay, ...) are this run's; only the state is loaded.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = ckpt.load_checkpoint(init_from, model, optimizer)
        for group, ours in zip(optimizer.param_groups, groups):
            group.update(ours)
        start_step = state["step"]
        loader.step = start_step
        if metrics:
            metrics.truncate_after(start_step)  # a crashed first attempt logged nothing to keep
            metrics.log("init_from", start_step, checkpoint=str(init_from))
        say(f"[bold]initialised[/] from {init_from} at step {start_step}")
    elif resume:
        say(f"no complete checkpoint in {checkpoints}; starting from step 0")

    if isinstance(loader, MixtureLoader) and info.is_main:
        plan = loader.accounting(cfg.train.steps)
        (run_dir / "mixture.json").write_text(json.dumps(plan, indent=1))
        for row in plan:
            say(
                f"  mixture stage {row['stage']}: {row['source']} {row['share']:.1%} "
                f"({row['tokens']:,} tokens, {row['epochs_cumulative']:.2f} epochs by stage end)"
            )

    n_params = count_params(cfg.model).total
    flops_per_token = train_flops_per_token(cfg.model, cfg.train.seq_len)
    peak, device_name = peak_flops(device.type, device.index or 0)
    say(
        f"[bold]crucible train[/] {cfg.name}: {n_params / 1e6:.2f}M params, "
        f"{cfg.train.steps} steps x {cfg.train.tokens_per_step:,} tokens, {world} process(es), "
        f"grad accum {grad_accum}, {device_name}, {amp or torch.float32}"
        + (", compiled" if cfg.train.compile else "")
    )
    say(f"run directory: {run_dir}")

    def save(step: int) -> Path:
        return ckpt.save_checkpoint(
            checkpoints,
            step,
            model,
            optimizer,
            {
                "loader": loader.state_dict(),
                "tokens_seen": step * cfg.train.tokens_per_step,
                "world_size": world,
                "strategy": cfg.distributed.strategy if world > 1 else "single",
            },
            cfg.checkpoint.keep_last,
        )

    def validate(step: int) -> dict[str, float]:
        val = evaluate_loss(model, val_batches, token_bytes, device, amp)
        if metrics:
            metrics.log("val", step, tokens=step * cfg.train.tokens_per_step, **val)
        say(f"  [cyan]val[/] step {step}: loss {val['val_loss']:.4f}  bpb {val['val_bpb']:.4f}")
        return val

    evaluator = None
    if cfg.eval.every or cfg.eval.every_tokens:  # imported only when enabled
        from crucible.evaluate.inloop import InLoopEval

        evaluator = InLoopEval(
            cfg.eval, tokenizer, cfg.model, cfg.train.tokens_per_step, cfg.train.steps, device, amp
        )
        for name, err in evaluator.errors.items():
            say(f"[yellow]eval task {name} skipped:[/] {err}")

    def run_eval(step: int) -> None:
        scores = evaluator(model)
        if metrics:
            metrics.log("eval", step, tokens=step * cfg.train.tokens_per_step, **scores)
        shown = "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if k.endswith("/acc_norm"))
        say(f"  [magenta]eval[/] step {step}: {shown} ({scores['eval_seconds']:.1f}s)")

    # ---- the loop
    model.train()
    val: dict[str, float] | None = None
    loss_acc = torch.zeros((), device=device)
    t_last, steps_since, step_time = time.perf_counter(), 0, None
    last_saved = start_step if latest is not None else None
    stage_name: str | None = None
    for step in range(start_step, end_step):
        lr = lr_at(step, cfg.train.steps, cfg.optim.lr, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if isinstance(loader, MixtureLoader):
            name = loader.stage_at_step(step)
            if name != stage_name:
                stage_name = name
                if metrics:
                    metrics.log("stage", step, stage=name)
                say(f"  [bold]stage[/] {name} from step {step}")
        batches = loader.next_step()
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            with sync_grads_context(model, last_micro_batch=i == len(batches) - 1):
                ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
                with ctx:
                    out = model(batch.tokens, batch.targets, doc_ids=batch.doc_ids)
                (out.loss / grad_accum).backward()
            loss_acc += out.loss.detach()
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        update_router_bias(model)  # MoE aux-loss-free balancing; a no-op otherwise
        optimizer.zero_grad(set_to_none=True)
        steps_since += 1
        done = step + 1

        if done % cfg.train.log_every == 0 or done in (end_step, cfg.train.steps):
            gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            (loss_sum,) = all_reduce_sum([loss_acc.item()], device)
            loss = loss_sum / (steps_since * grad_accum * world)
            elapsed = time.perf_counter() - t_last
            dt = elapsed / steps_since
            step_time = dt if step_time is None else 0.7 * step_time + 0.3 * dt
            tok_s = cfg.train.tokens_per_step / dt
            achieved = flops_per_token * tok_s / world
            mfu = achieved / peak if peak else None
            eta = step_time * (end_step - done)
            if metrics:
                metrics.log(
                    "train",
                    done,
                    loss=loss,
                    lr=lr,
                    grad_norm=float(gn),
                    tokens=done * cfg.train.tokens_per_step,
                    tokens_per_s=tok_s,
                    flops_per_s_per_device=achieved,
                    **({"mfu": mfu} if mfu is not None else {}),
                )
            speed = f"MFU {mfu:5.1%}" if mfu is not None else f"{achieved / 1e9:6.1f} GFLOP/s"
            say(
                f"step {done:>6}/{cfg.train.steps}  loss {loss:7.4f}  lr {lr:.2e}  "
                f"gnorm {float(gn):6.3f}  {tok_s:9,.0f} tok/s  {speed}  "
                f"ETA {format_duration(eta)}"
            )
            loss_acc.zero_()
            t_last, steps_since = time.perf_counter(), 0

        pause = time.perf_counter()
        if cfg.train.val_every and done % cfg.train.val_every == 0 and done < cfg.train.steps:
            val = validate(done)
        if evaluator is not None and evaluator.due(done):
            run_eval(done)
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.train.steps:
            save(done)
            last_saved = done
        t_last += time.perf_counter() - pause  # keep throughput honest: exclude eval and saves

    if end_step < cfg.train.steps:
        # Stopped early (train.stop_at): a checkpoint at end_step and stopped.json, no validation
        # and no summary.json: the run is not finished (resuming without stop_at continues it).
        stop_ckpt = (
            save(end_step) if last_saved != end_step else ckpt.step_dir(checkpoints, end_step)
        )
        if metrics:
            metrics.close()
            stopped = {"name": cfg.name, "step": end_step, "checkpoint": stop_ckpt.name}
            tmp = run_dir / "stopped.json.tmp"
            tmp.write_text(json.dumps(stopped, indent=1))
            tmp.replace(run_dir / "stopped.json")
        barrier()
        return TrainResult(run_dir, end_step, None, stop_ckpt, run_dir / "tokenizer.json")

    final_step = cfg.train.steps
    val = validate(final_step)
    final_ckpt = (
        save(final_step) if last_saved != final_step else ckpt.latest_checkpoint(checkpoints)
    )
    if metrics:
        metrics.close()
        summary = {
            "name": cfg.name,
            "step": final_step,
            "tokens": final_step * cfg.train.tokens_per_step,
            "params": n_params,
            "checkpoint": final_ckpt.name if final_ckpt else None,
            **val,
        }
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(run_dir / "summary.json")
    barrier()
    return TrainResult(run_dir, final_step, val, final_ckpt, run_dir / "tokenizer.json")
