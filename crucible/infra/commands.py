"""Command-line entry points: `register(subparsers)` adds `bench` (collectives, matmul, copy,
storage, loader) and `doctor` to the `crucible` parser.

Handlers return an exit code; bad input raises ValueError / FileNotFoundError subclasses whose
message is one line for the user (the CLI prints it without a traceback).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from crucible.argtypes import JSON_HELP, fraction, nonneg_int, positive_float, positive_int
from crucible.infra.results import Table, tables_json, to_markdown, write_json

GPU_HELP = "compare with this table entry instead of the detected card (`crucible plan hardware`)"


def _emit(tables: list[Table], args: argparse.Namespace, extra: dict[str, Any]) -> None:
    print("\n".join(to_markdown(t) for t in tables), end="")
    if args.json:
        write_json(
            args.json,
            {"command": f"bench {args.bench_command}", **extra, "tables": tables_json(tables)},
        )
        if args.json != "-":
            print(f"\nwrote {args.json}", file=sys.stderr)


def _device(args: argparse.Namespace):
    import torch

    if getattr(args, "cpu", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _header(device) -> dict[str, Any]:
    import torch

    from crucible.infra.kernels import device_name

    return {"device": device_name(device), "torch": torch.__version__}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------- handlers


def _cmd_collectives(args: argparse.Namespace) -> int:
    from crucible.infra import collectives as co
    from crucible.infra.timing import parse_size
    from crucible.train.distributed import finish, launched_by_torchrun

    ops = _csv(args.ops)
    for op in ops:
        co.bus_factor(op, 2)  # unknown names fail here, before any process starts
    if args.dtype not in co.DTYPES:
        raise ValueError(f"unknown dtype '{args.dtype}' (known: {', '.join(co.DTYPES)})")
    backend = co.pick_backend(args.backend)
    sizes = [parse_size(s, "--sizes") for s in _csv(args.sizes or co.default_sizes(backend))]
    params = dict(ops=ops, sizes=sizes, dtype=args.dtype, iters=args.iters, warmup=args.warmup)
    if launched_by_torchrun():
        import torch.distributed as dist

        results = co.torchrun_collectives(backend, **params)
        code = 1 if any(r.wrong for r in results) else 0
        if dist.get_rank() == 0:
            _emit([co.results_table(results)], args, {"backend": backend})
        finish(code)  # exits the process (gloo teardown rule)
        return code
    nproc = args.nproc or co.default_nproc(backend)
    try:
        results = co.spawn_collectives(nproc, backend, **params)
    except co.CollectiveError as e:
        print(f"crucible bench collectives: {e}", file=sys.stderr)
        return 1
    _emit([co.results_table(results)], args, {"backend": backend})
    return 1 if any(r.wrong for r in results) else 0


def _cmd_matmul(args: argparse.Namespace) -> int:
    from crucible.infra import kernels

    device = _device(args)
    acc = kernels.device_accelerator(device, args.gpu)
    dtypes = tuple(_csv(args.dtypes)) if args.dtypes else None
    rows = kernels.matmul_bench(device, dtypes, args.size, acc, args.min_time)
    head = _header(device)
    notes = [f"{head['device']}, torch {head['torch']}; 2n^3 FLOP per matmul, median time"]
    notes.append(
        f"peaks: {acc.name}, dense (2:4 sparse never used)"
        if acc
        else "no table entry for this device: measured figures only"
    )
    _emit([kernels.kernels_table("Matmul", rows, notes)], args, head)
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    from crucible.infra import kernels
    from crucible.infra.timing import parse_size

    device = _device(args)
    acc = kernels.device_accelerator(device, args.gpu)
    nbytes = parse_size(args.bytes, "--bytes") if args.bytes else None
    rows, notes = kernels.copy_bench(device, nbytes, acc, args.min_time)
    head = _header(device)
    _emit([kernels.kernels_table("Copy bandwidth", rows, [head["device"], *notes])], args, head)
    return 0


def _cmd_storage(args: argparse.Namespace) -> int:
    from crucible.infra import storage
    from crucible.infra.timing import parse_size

    rows, notes = [], []
    if args.size:
        path, wrote = storage.write_test_file(args.dir, parse_size(args.size, "--size"))
        try:
            read = storage.read_throughput_file(path)
        finally:
            if not args.keep:
                path.unlink(missing_ok=True)
        rows = [wrote, read]
        notes.append(
            "fresh test file, written with fsync then read back; a file larger than "
            "memory cannot be served from the page cache"
        )
    else:
        limit = parse_size(args.limit, "--limit") if args.limit else None
        rows = [storage.read_throughput(args.dir, limit)]
        notes.append(
            "files read one after the other in path order; nothing is dropped from "
            "the OS page cache, which may serve recently read files (--size SIZE "
            "writes a fresh file; make it larger than memory to defeat the cache)"
        )
    table = Table(
        "Storage throughput",
        ["what", "files", "bytes", "seconds", "MB/s"],
        [{**asdict(r), "MB/s": r.mb_s} for r in rows],
        [*notes, "MB/s = 10^6 bytes per second"],
    )
    _emit([table], args, {"dir": str(args.dir)})
    return 0


def _cmd_loader(args: argparse.Namespace) -> int:
    from crucible.infra.dataload import loader_throughput

    r = loader_throughput(args.shards, args.seq_len, args.batch, args.min_time, eos_id=args.eos_id)
    row = {**asdict(r), "tokens/s": r.tokens_per_s, "MB/s": r.mb_s}
    table = Table(
        "Data loader (PretrainLoader)",
        ["shards", "corpus_tokens", "seq_len", "batch", "steps", "tokens", "tokens/s", "MB/s"],
        [row],
        [
            "host side only: shuffled chunks read from memory-mapped shards into int64 batches, "
            "no device copy; the page cache may serve shards read before"
        ],
    )
    _emit([table], args, {"shards": str(args.shards)})
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from crucible.infra.doctor import report_markdown, run_doctor

    report = run_doctor(
        None if args.no_storage else args.storage,
        gpu=args.gpu,
        measure=not args.no_measure,
        min_time_s=args.min_time,
        threshold=args.threshold,
    )
    print(report_markdown(report), end="")
    if args.json:
        write_json(args.json, report.to_json())
        if args.json != "-":
            print(f"\nwrote {args.json}", file=sys.stderr)
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------- parsers


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="PATH", help=JSON_HELP)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` and `doctor` to `crucible`'s subparsers."""
    b = subparsers.add_parser(
        "bench",
        help="measure collectives, matmul, copies, storage and the data loader",
        description="Short measurements set against the hardware table (dense peaks). Results "
        "print as Markdown tables; --json PATH writes them too.",
    )
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="WHAT")

    p = bsub.add_parser(
        "collectives",
        help="all-reduce, all-gather, reduce-scatter, all-to-all, broadcast bandwidth",
        description="Time collectives over torch.distributed and report algbw = S/t and busbw "
        "= algbw x factor with nccl-tests' conventions. Spawns --nproc local ranks itself, or "
        "runs under `torchrun --nproc_per_node N -m crucible bench collectives` (any number "
        "of nodes). gloo on CPU, NCCL on GPU by default.",
        epilog="Example: crucible bench collectives --nproc 2 --sizes 1M,16M",
    )
    p.add_argument(
        "--nproc", type=positive_int, default=None, help="ranks to spawn (default: GPUs, or 2)"
    )
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    p.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter,all_to_all,broadcast")
    p.add_argument("--sizes", default=None, help="S per op, e.g. 1M,64M,1G (default by backend)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--iters", type=positive_int, default=10, help="timed operations per size")
    p.add_argument("--warmup", type=nonneg_int, default=2)
    _common(p)
    p.set_defaults(func=_cmd_collectives)

    p = bsub.add_parser(
        "matmul",
        help="matmul TFLOP/s per dtype against the table's dense peak",
        description="Square matmuls per dtype (GPU: fp32 without TF32, tf32, bf16, fp16, fp8; "
        "CPU: fp32, bf16), 2n^3 FLOP each, against the card's dense peak.",
    )
    p.add_argument("--dtypes", default=None, help="comma list, e.g. bf16,fp8")
    p.add_argument("--size", type=positive_int, default=None, help="n (default 8192 GPU, 1024 CPU)")
    p.add_argument("--gpu", default=None, help=GPU_HELP)
    p.add_argument("--cpu", action="store_true", help="measure the CPU even if CUDA is present")
    p.add_argument("--min-time", type=positive_float, default=0.5, help="seconds per dtype")
    _common(p)
    p.set_defaults(func=_cmd_matmul)

    p = bsub.add_parser(
        "copy",
        help="host memcpy, pinned host<->device and device<->device bandwidth",
        description="Copy bandwidth: host<->device per direction against the card's PCIe "
        "link, device<->device (read + write) against its memory bandwidth. Without CUDA only "
        "host memcpy is measured.",
    )
    p.add_argument("--bytes", default=None, help="buffer size (default 1G GPU, 128M CPU)")
    p.add_argument("--gpu", default=None, help=GPU_HELP)
    p.add_argument("--cpu", action="store_true", help="host memcpy only")
    p.add_argument("--min-time", type=positive_float, default=0.3, help="seconds per copy kind")
    _common(p)
    p.set_defaults(func=_cmd_copy)

    p = bsub.add_parser(
        "storage",
        help="sequential read throughput of a directory (MB/s)",
        description="Read the files under DIR one after the other and report MB/s. The OS "
        "page cache is left alone and may serve files read recently; --size writes a fresh "
        "file (make it larger than memory to measure the device itself), reads it, deletes it.",
    )
    p.add_argument("dir", help="directory to read (and, with --size, to write the test file in)")
    p.add_argument("--limit", default="1G", help="stop after this many bytes (default 1G)")
    p.add_argument("--size", default=None, help="write and read a fresh test file of this size")
    p.add_argument("--keep", action="store_true", help="keep the --size test file")
    _common(p)
    p.set_defaults(func=_cmd_storage)

    p = bsub.add_parser(
        "loader",
        help="PretrainLoader tokens/s over a shard directory",
        description="Pull shuffled batches from .ds shards with the training loader and report "
        "tokens/s (host side, no device copy).",
    )
    p.add_argument("shards", help="a shard directory, glob or .ds file")
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--min-time", type=positive_float, default=1.0, help="seconds to measure")
    p.add_argument(
        "--eos-id", type=nonneg_int, default=None, help="when the shards lack dataset.json"
    )
    _common(p)
    p.set_defaults(func=_cmd_loader)

    p = subparsers.add_parser(
        "doctor",
        help="environment report, device health against the table, checkpoint round trip",
        description="Report versions (python, torch, transformers, tokenizers, CUDA, NCCL), "
        "devices and their table match, CUDA_/NCCL_/OMP_/torch variables, CPU and NUMA "
        "layout; time each device (bf16 matmul, copies) and fail a figure below --threshold "
        "of the table; write a small model + optimizer checkpoint on --storage, read it back "
        "and compare bit for bit. Exit code 1 when a check fails.",
    )
    p.add_argument("--storage", default=".", help="directory for the checkpoint round trip")
    p.add_argument("--no-storage", action="store_true", help="skip the checkpoint round trip")
    p.add_argument("--no-measure", action="store_true", help="environment only, no timings")
    p.add_argument("--gpu", default=None, help=GPU_HELP)
    p.add_argument("--threshold", type=fraction, default=0.5, help="fail below this share of table")
    p.add_argument("--min-time", type=positive_float, default=0.3, help="seconds per timing")
    p.add_argument("--json", default=None, metavar="PATH", help=JSON_HELP)
    p.set_defaults(func=_cmd_doctor)
