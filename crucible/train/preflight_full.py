"""`crucible preflight`: the fast checks, and with `full` the ones that build the model.

Full mode builds the model exactly as training does (`setup.init_model`, the same wrapper and
optimizer), then checks that every rank initialised the same weights, runs a few real training
steps (`train_step`) for a throughput figure, and saves, damages and reloads a checkpoint in a
temporary directory beside the run directories (the storage the run will write to).
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from crucible.config import RunConfig
from crucible.plan.flops import train_flops_per_token
from crucible.plan.report import PlanRequest
from crucible.tokenizer.train import EOS_TOKEN, load_tokenizer
from crucible.train import checkpoint as ckpt
from crucible.train import setup
from crucible.train.distributed import DistInfo, barrier, init_distributed
from crucible.train.metrics import peak_flops
from crucible.train.optim import build_optimizer
from crucible.train.parallelize import build_model
from crucible.train.preflight import (
    Check,
    ExtraCheck,
    check_batch,
    check_memory,
    check_same_weights,
    check_schedule,
    check_seq_len,
    fast_checks,
    gather,
    prepare_for_preflight,
    tensor_digest,
)
from crucible.train.state import Run
from crucible.train.step import train_step

SMOKE_STEPS = 3  # the first is a warm-up; tokens/s is measured over the others
PLANNER_MFU = PlanRequest.mfu  # the MFU `crucible plan` assumes by default


def run_preflight(
    cfg: RunConfig, full: bool = False, extra: Sequence[ExtraCheck] = ()
) -> tuple[list[Check], DistInfo]:
    """Every check for `cfg` on this machine (collective under torchrun)."""
    device = setup.resolve_device(cfg.train.device)
    info = init_distributed(cfg, device.type)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    data, data_check = prepare_for_preflight(cfg, info)
    if data is None:
        checks = [check_batch(cfg, info.dp_size), check_schedule(cfg), check_seq_len(cfg)]
        checks += [data_check, check_memory(cfg, info.world_size, device)]
        return checks, info
    checks = fast_checks(cfg, info, device, data)
    if full:
        checks += model_checks(cfg, info, device, data, checks[0].status == "pass")
        checks += [check(cfg) for check in extra]
    return checks, info


def _plain_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (DDP's module., compile's _orig_mod.)."""
    return ".".join(p for p in name.split(".") if p not in ("module", "_orig_mod"))


def check_assembled_weights(model: torch.nn.Module, reference: torch.nn.Module) -> Check:
    """The model as the layout shards it must assemble to the unsharded initial weights: ranks
    holding different shards of a randomly initialised tensor must have drawn different numbers
    (SmolLM3's tensor-parallel seed bug: identical shards, a silently wrong model)."""
    ref = {_plain_name(n): p for n, p in reference.named_parameters()}
    bad = []
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective, same order
        theirs = ref.get(_plain_name(name))
        if theirs is None or not torch.equal(full.detach().cpu(), theirs.detach().cpu()):
            bad.append(_plain_name(name))
    if bad:
        return Check(
            "ranks: sharded initial weights",
            "fail",
            f"{len(bad)} tensor(s) assemble to other weights than a single process would "
            f"initialise, first {bad[0]} (shards drawn from the same RNG stream?)",
        )
    return Check(
        "ranks: sharded initial weights",
        "pass",
        "the sharded model assembles to exactly the single-process initial weights",
    )


def model_checks(cfg: RunConfig, info: DistInfo, device: torch.device, data, batch_ok: bool):
    reference = setup.init_model(cfg, device)  # unsharded, from the seed alone
    checks = [check_same_weights(reference, info)] if info.enabled else []
    if not batch_ok:
        return checks
    model = build_model(cfg, info, device, setup.autocast_dtype(cfg.train.dtype, device))
    if info.enabled:
        checks.append(check_assembled_weights(model, reference))
    del reference
    eos = load_tokenizer(data.tokenizer_path).token_to_id(EOS_TOKEN)
    scratch = _scratch_dir(cfg, info)
    try:
        run = Run(
            cfg=cfg,
            info=info,
            device=device,
            amp=setup.autocast_dtype(cfg.train.dtype, device),
            model=model,
            optimizer=build_optimizer(model, cfg.optim, device),
            loader=setup.make_loader(cfg, data, info.dp_rank, info.dp_size, eos),
            run_dir=scratch,
            grad_accum=cfg.train.global_batch_size // (cfg.train.micro_batch_size * info.dp_size),
            end_step=cfg.train.steps,
            metrics=None,
            say=lambda *a, **k: None,
        )
        checks.append(check_throughput(run))
        checks.append(check_checkpoint_round_trip(run))
    finally:
        barrier()
        if info.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
    return checks


def _scratch_dir(cfg: RunConfig, info: DistInfo) -> Path:
    """A fresh directory beside the run directories, the same path on every rank."""
    name = [f".preflight-{uuid.uuid4().hex[:8]}"]
    if info.enabled:
        dist.broadcast_object_list(name, src=0)
    path = Path(cfg.out_dir) / name[0]
    if info.is_main:
        path.mkdir(parents=True)
    barrier()
    return path


def check_throughput(run: Run, steps: int = SMOKE_STEPS) -> Check:
    """A few real steps: finite losses, tokens/s, and the planner's estimate where it has one."""
    losses, t0 = [], 0.0
    for i in range(steps):
        if i == 1:
            t0 = time.perf_counter()
        losses.append(train_step(run, i).loss)
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(x) for x in losses):
        return Check("throughput", "fail", f"non-finite loss in the first {steps} steps: {losses}")
    tps = run.tokens_per_step * (steps - 1) / seconds
    measured = (
        f"{tps:,.0f} tokens/s over steps 2-{steps} (loss {losses[0]:.3f} -> {losses[-1]:.3f})"
    )
    peak, name = peak_flops(run.device.type, run.device.index or 0)
    if peak is None:
        return Check("throughput", "pass", f"{measured}; no peak FLOP/s known for {name}")
    fpt = train_flops_per_token(run.cfg.model, run.cfg.train.seq_len)
    planned = peak * PLANNER_MFU / fpt * run.info.world_size
    detail = f"{measured}; the planner expects {planned:,.0f} at MFU {PLANNER_MFU:.0%} on {name}"
    if tps < 0.5 * planned:
        return Check("throughput", "warn", f"{detail}: under half of it")
    return Check("throughput", "pass", detail)


def check_checkpoint_round_trip(run: Run) -> Check:
    """Save, change every weight, load: the weights are back and the manifest verifies."""
    root = run.run_dir / "checkpoints"
    state = {"loader": run.loader.state_dict(), "world_size": run.info.world_size}
    try:
        path = ckpt.save_checkpoint(root, 1, run.model, run.optimizer, state, 1)
        ckpt.finalize_pending()
        before = tensor_digest(list(run.model.parameters()))
        with torch.no_grad():
            for p in run.model.parameters():
                p.add_(1.0)
        ckpt.load_checkpoint(path, run.model, run.optimizer)
        same = tensor_digest(list(run.model.parameters())) == before
        problems = [str(p) for p in ckpt.verify_checkpoint(path)] if run.info.is_main else []
    except (OSError, ValueError, RuntimeError) as e:
        return Check("checkpoint round trip", "fail", f"{type(e).__name__}: {e}")
    results = [r.split(":", 1) for r in gather(f"{int(same)}:{'; '.join(problems)}", run.info)]
    damaged = [r[1] for r in results if r[1]]
    if damaged:
        return Check("checkpoint round trip", "fail", f"{path.name}: {damaged[0]}")
    if any(r[0] != "1" for r in results):
        return Check("checkpoint round trip", "fail", "weights differ after save and load")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
    return Check(
        "checkpoint round trip",
        "pass",
        f"saved, verified and reloaded identical weights ({size / 2**20:.1f} MiB, written under {run.cfg.out_dir})",
    )
