"""Preflight: what can be known to be wrong with a run before it spends its budget.

Each check gives a row `pass`, `warn` or `fail` with one line of detail. The fast checks read
only the config, the tokenizer and the shards' metadata (`fast_checks`): `crucible train` runs
them before it touches the run directory, prints the table only when something warns or fails,
and stops with exit 2 on a fail. `crucible preflight CONFIG [--full]` prints the whole table;
`--full` adds the checks that build the model (`preflight_model`): a checkpoint round trip, a
short throughput test against the planner's estimate and, under torchrun, that every rank starts
from the same weights (the SmolLM3 tensor-parallel seed lesson). Checks from higher layers (the
eval tasks load) are passed in by the caller.

Under torchrun every rank runs the same checks (some are collective); a fail on any rank is a
fail on all of them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from crucible.config import ConfigError, RunConfig
from crucible.data.mixture import EPOCH_WARNING, MixtureLoader
from crucible.data.prepare import PreparedData, check_tokenizer_vocab, prepare_data
from crucible.data.shards import ShardSet
from crucible.plan.memory import GiB, Layout, LayoutError, estimate_memory
from crucible.tokenizer.train import EOS_TOKEN, load_tokenizer
from crucible.train.distributed import DistInfo, barrier
from crucible.train.setup import make_loader

Status = Literal["pass", "warn", "fail"]
LR_WARNING = 0.05  # AdamW peak LRs of LLM pretraining are ~1e-4 to ~1e-2


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


ExtraCheck = Callable[[RunConfig], Check]


# --------------------------------------------------------------------------- config arithmetic


def check_batch(cfg: RunConfig, world: int) -> Check:
    t = cfg.train
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        return Check(
            "batch",
            "fail",
            f"train.global_batch_size {t.global_batch_size} is not divisible by "
            f"micro_batch_size {t.micro_batch_size} x {world} data-parallel process(es)",
        )
    accum = t.global_batch_size // per_step
    return Check(
        "batch",
        "pass",
        f"{t.global_batch_size} sequences = micro {t.micro_batch_size} x {world} process(es) x "
        f"accum {accum}; {t.tokens_per_step:,} tokens per step",
    )


def check_schedule(cfg: RunConfig) -> Check:
    lr, s, steps = cfg.optim.lr, cfg.schedule, cfg.train.steps
    if s.min_lr > lr:
        return Check(
            "learning rate",
            "fail",
            f"schedule.min_lr {s.min_lr:g} is above optim.lr {lr:g}: the decay would raise it",
        )
    problems = []
    if s.warmup_steps >= steps:
        problems.append(
            f"schedule.warmup_steps {s.warmup_steps} >= train.steps {steps}: "
            f"the LR never reaches optim.lr {lr:g}"
        )
    if s.kind != "constant" and s.min_lr == lr:
        problems.append(f"schedule.min_lr equals optim.lr: the {s.kind} schedule never decays")
    if s.kind == "wsd" and steps - round(s.decay_fraction * steps) < s.warmup_steps:
        problems.append("the WSD decay starts before warmup ends")
    if lr > LR_WARNING:
        problems.append(f"optim.lr {lr:g} is unusually high for AdamW (> {LR_WARNING:g})")
    if problems:
        return Check("learning rate", "warn", "; ".join(problems))
    return Check(
        "learning rate",
        "pass",
        f"{s.kind}: warmup {s.warmup_steps} of {steps} steps to {lr:g}, then to {s.min_lr:g}",
    )


def check_seq_len(cfg: RunConfig) -> Check:
    seq, most = cfg.train.seq_len, cfg.model.max_seq_len
    if seq > most:
        return Check(
            "sequence length", "fail", f"train.seq_len {seq} exceeds model.max_seq_len {most}"
        )
    return Check("sequence length", "pass", f"train.seq_len {seq} <= model.max_seq_len {most}")


# --------------------------------------------------------------------------- data


def check_data(cfg: RunConfig, data: PreparedData) -> Check:
    """prepare_data has checked sizes and vocabularies; add the end-of-text id they share."""
    n = check_tokenizer_vocab(data.tokenizer_path, cfg.model.vocab_size)
    eos = load_tokenizer(data.tokenizer_path).token_to_id(EOS_TOKEN)
    dirs = dict(data.sources or {"train": data.train_dir})
    dirs["val"] = data.val_dir
    for name, path in dirs.items():
        shards = ShardSet(path)
        if eos is not None and shards.eos_id is not None and shards.eos_id != eos:
            return Check(
                "tokenizer and shards",
                "fail",
                f"{name} shards {path} end documents with id {shards.eos_id}, the tokenizer's "
                f"{EOS_TOKEN} is {eos}: they were tokenized with another tokenizer",
            )
    return Check(
        "tokenizer and shards",
        "pass",
        f"tokenizer {n} tokens <= model.vocab_size {cfg.model.vocab_size}; "
        f"{len(dirs)} shard set(s) agree with it",
    )


def check_tokens(cfg: RunConfig, loader) -> Check:
    """Tokens the run draws against tokens available, per source (the mixture's accounting)."""
    steps = cfg.train.steps
    if isinstance(loader, MixtureLoader):
        worst: dict[str, float] = {}
        for row in loader.accounting(steps):
            worst[row["source"]] = max(worst.get(row["source"], 0.0), row["epochs_cumulative"])
    else:
        worst = {"train": steps * cfg.train.global_batch_size / loader.n_chunks}
    planned = steps * cfg.train.tokens_per_step
    detail = f"{planned:,} tokens planned; epochs per source: " + ", ".join(
        f"{k} {v:.2f}" for k, v in worst.items()
    )
    over = [k for k, v in worst.items() if v > EPOCH_WARNING]
    if over:
        return Check(
            "tokens vs data",
            "warn",
            f"{detail}; {', '.join(over)} repeated more than {EPOCH_WARNING:g} times "
            "(gains fade after ~4 epochs)",
        )
    return Check("tokens vs data", "pass", detail)


# --------------------------------------------------------------------------- memory


def available_memory(device: torch.device) -> tuple[float | None, float | None, str]:
    """Bytes of `device` (None: unknown), bytes free now, and where the figures come from."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return float(total), float(free), torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = {line.split(":")[0]: line.split()[1] for line in f}
            have = float(info["MemAvailable"]) * 1024
            return have, have, "available host RAM"
        except (OSError, KeyError, IndexError):
            return None, None, "host RAM (unknown on this system)"
    return None, None, f"{device.type} memory (not measurable)"


def check_memory(cfg: RunConfig, world: int, device: torch.device) -> Check:
    """The planner's peak per process (crucible's autocast engine) against the device."""
    t = cfg.train
    sharded = world > 1 and cfg.distributed.strategy == "fsdp"
    try:
        layout = Layout(
            dp=world,
            zero=3 if sharded else 0,
            micro_batch=t.micro_batch_size,
            seq_len=t.seq_len,
            grad_accum=max(1, t.global_batch_size // (t.micro_batch_size * world)),
        )
        peak = estimate_memory(cfg.model, layout, precision="autocast").peak
    except LayoutError as e:
        return Check("memory", "fail", f"the planner refuses this layout: {e}")
    have, free, where = available_memory(device)
    if device.type == "cpu":  # the processes of one host share its RAM
        peak *= int(os.environ.get("LOCAL_WORLD_SIZE", world))
    need = f"planned peak {_size(peak)}"
    if have is None or free is None:
        return Check("memory", "warn", f"{need}; {where}")
    detail = f"{need} of {_size(have)} ({where}, {_size(free)} free)"
    if peak > have:
        return Check("memory", "fail", f"{detail}: does not fit")
    if peak > 0.8 * have:
        return Check("memory", "warn", f"{detail}: over 80%, little headroom")
    if peak > free:
        return Check("memory", "warn", f"{detail}: more than is free now")
    return Check("memory", "pass", detail)


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- ranks


def tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def gather(value: str, info: DistInfo) -> list[str]:
    if not info.enabled:
        return [value]
    out: list[str] = [""] * info.world_size
    dist.all_gather_object(out, value)
    return out


def check_data_order(loader, info: DistInfo) -> Check:
    """Data-parallel ranks must read different sequences (their first micro-batches differ);
    the ranks of one tensor-parallel group must read the same ones."""
    first = loader.step_batches(0)[0]
    digests = gather(tensor_digest([first.tokens]), info)
    tp = info.tp
    groups = [digests[d * tp : (d + 1) * tp] for d in range(len(digests) // tp)]
    split = [d * tp + i for d, g in enumerate(groups) for i in range(1, tp) if g[i] != g[0]]
    if split:
        return Check(
            "ranks: data order",
            "fail",
            f"rank(s) {split} read other data than their tensor-parallel group's first rank: "
            "the shards of one layer would see different inputs",
        )
    heads = [g[0] for g in groups]
    same = [d * tp for d in range(1, len(heads)) if heads[d] in heads[:d]]
    if same:
        return Check(
            "ranks: data order",
            "fail",
            f"rank(s) {same} read the same first micro-batch as a lower data-parallel rank: "
            "every rank would train on the same data",
        )
    return Check(
        "ranks: data order",
        "pass",
        f"{len(heads)} data-parallel ranks read different first micro-batches"
        + (f", each shared by its {tp} tensor-parallel ranks" if tp > 1 else ""),
    )


def check_same_weights(model: torch.nn.Module, info: DistInfo) -> Check:
    """Ranks must start from the same weights (FSDP2 keeps each rank's own initial shard)."""
    digests = gather(tensor_digest([p for p in model.parameters()]), info)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        return Check(
            "ranks: initial weights",
            "fail",
            f"rank(s) {differ} initialised different weights from rank 0 (a per-rank seed?): "
            "the shards would not form one model",
        )
    return Check(
        "ranks: initial weights",
        "pass",
        f"{len(digests)} ranks initialised identical weights (sha256 {digests[0]})",
    )


# --------------------------------------------------------------------------- running


def fast_checks(
    cfg: RunConfig, info: DistInfo, device: torch.device, data: PreparedData
) -> list[Check]:
    """The cheap checks: config, data and memory; under torchrun also the data order."""
    checks = [check_batch(cfg, info.dp_size), check_schedule(cfg), check_seq_len(cfg)]
    checks.append(check_data(cfg, data))
    if checks[0].status == "pass":  # the loader needs a valid batch split
        eos = load_tokenizer(data.tokenizer_path).token_to_id(EOS_TOKEN)
        loader = make_loader(cfg, data, info.dp_rank, info.dp_size, eos)
        checks.append(check_tokens(cfg, loader))
        if info.enabled:
            checks.append(check_data_order(loader, info))
    checks.append(check_memory(cfg, info.world_size, device))
    return checks


def any_rank_failed(checks: Sequence[Check], info: DistInfo, device: torch.device) -> bool:
    failed = any(c.status == "fail" for c in checks)
    if not info.enabled:
        return failed
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([float(failed)], device=comm)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def print_table(checks: Sequence[Check], title: str = "preflight") -> None:
    from rich.table import Table

    from crucible.train.metrics import console

    style = {"pass": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(title=title, show_lines=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{style[c.status]}]{c.status}[/]", c.detail)
    console.print(table)


def preflight_at_start(
    cfg: RunConfig, info: DistInfo, device: torch.device, data: PreparedData, quiet: bool
) -> list[Check]:
    """`crucible train`'s fast mode: silent when all pass; the table on a warn or a fail;
    ConfigError (exit 2) on a fail, on every rank, before the run directory is touched."""
    checks = fast_checks(cfg, info, device, data)
    failed = any_rank_failed(checks, info, device)
    if info.is_main and not quiet and any(c.status != "pass" for c in checks):
        print_table(checks, f"preflight of {cfg.name}")
    if failed:
        bad = [f"{c.name}: {c.detail}" for c in checks if c.status == "fail"]
        raise ConfigError(
            "preflight failed: "
            + ("; ".join(bad) if bad else "on another rank (see its table)")
            + " (crucible preflight CONFIG shows every check)"
        )
    return checks


def prepare_for_preflight(cfg: RunConfig, info: DistInfo) -> tuple[PreparedData | None, Check]:
    """prepare_data (rank 0 first, as training does), its refusal turned into a fail row."""
    data, error = None, None
    for turn in ("main", "others"):
        if (turn == "main") == info.is_main:
            try:
                data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, quiet=True)
            except (ValueError, FileNotFoundError) as e:
                error = str(e)
        barrier()
    if error is not None:
        return None, Check("tokenizer and shards", "fail", error)
    assert data is not None
    return data, check_data(cfg, data)
