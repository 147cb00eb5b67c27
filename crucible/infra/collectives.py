"""Collective bandwidth over torch.distributed, reported with nccl-tests' conventions.

Conventions (nccl-tests doc/PERFORMANCE.md): S is the size of the *whole* operation in bytes and
t the time of one operation; algbw = S / t and busbw = algbw x factor, where the factor turns the
algorithm bandwidth into what each rank's link carries, comparable with the link's peak whatever
the rank count n:

| collective | S | factor |
|---|---|---|
| all-reduce | the buffer (same on every rank) | 2(n-1)/n |
| all-gather | the gathered output = n x each rank's input | (n-1)/n |
| reduce-scatter | the input = n x each rank's output | (n-1)/n |
| all-to-all | each rank's send buffer (n chunks) | (n-1)/n |
| broadcast | the buffer | 1 |

Time: after a barrier, `iters` back-to-back operations are timed and averaged on every rank; the
slowest rank's mean is reported (a collective is as fast as its slowest participant). Each size is
first run once on patterned data and checked (`wrong` counts mismatched elements, as nccl-tests'
#wrong column).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from crucible.infra.results import Table
from crucible.infra.timing import human_bytes

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw / algbw for `op` on `n` ranks."""
    if n < 1:
        raise ValueError(f"rank count must be >= 1, got {n}")
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if op == "broadcast":
        return 1.0
    raise ValueError(f"unknown collective '{op}' (known: {', '.join(OPS)})")


def bandwidths(op: str, size_bytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (10^9 bytes) for one operation of S = `size_bytes`."""
    algbw = size_bytes / seconds / 1e9
    return algbw, algbw * bus_factor(op, n)


@dataclass
class CollectiveResult:
    op: str
    size_bytes: int  # S, the nccl-tests size (rounded down to whole elements per rank)
    ranks: int
    backend: str
    dtype: str
    time_us: float
    algbw_gbs: float
    busbw_gbs: float
    wrong: int


# ----------------------------------------------------------------------------- one operation


class _Buffers:
    """Input/output tensors of one collective at S bytes, with their check pattern."""

    def __init__(self, op: str, size_bytes: int, n: int, rank: int, dtype, device):
        el = torch.empty((), dtype=dtype).element_size()
        per_rank = max(1, size_bytes // el // n)  # elements of one rank's chunk
        self.total = per_rank * n  # S in elements
        self.op, self.n, self.rank, self.per_rank = op, n, rank, per_rank
        big = self.total
        kw = {"dtype": dtype, "device": device}
        if op == "all_gather":
            self.inp, self.out = torch.empty(per_rank, **kw), torch.empty(big, **kw)
        elif op == "reduce_scatter":
            self.inp, self.out = torch.empty(big, **kw), torch.empty(per_rank, **kw)
        elif op == "all_to_all":
            self.inp, self.out = torch.empty(big, **kw), torch.empty(big, **kw)
        else:  # all_reduce, broadcast: in place
            self.inp = torch.empty(big, **kw)
            self.out = self.inp
        self.size_bytes = self.total * el

    def run(self) -> None:
        op, inp, out = self.op, self.inp, self.out
        if op == "all_reduce":
            dist.all_reduce(inp)
        elif op == "all_gather":
            _all_gather(out, inp)
        elif op == "reduce_scatter":
            _reduce_scatter(out, inp)
        elif op == "all_to_all":
            dist.all_to_all_single(out, inp)
        elif op == "broadcast":
            dist.broadcast(inp, src=0)

    def fill_pattern(self) -> None:
        """Integers below 256, exact in bf16, whose result every rank can predict. Reductions
        sum ones (a missing or doubled rank changes n); gathers carry the sender's identity."""
        r, n, k = self.rank, self.n, self.per_rank
        if self.op == "all_to_all":
            # chunk j sent by rank r carries r*n + j; rank r then receives j*n + r from rank j.
            vals = (torch.arange(n, dtype=torch.float32) + r * n) % 256
            self.inp.copy_(vals.repeat_interleave(k))
        elif self.op == "broadcast":
            self.inp.fill_(7.0 if r == 0 else 0.0)
        elif self.op == "all_gather":
            self.inp.fill_(float((r + 1) % 256))
        else:
            self.inp.fill_(1.0)

    def expected(self) -> torch.Tensor:
        r, n, k = self.rank, self.n, self.per_rank
        if self.op in ("all_reduce", "reduce_scatter"):
            return torch.full((self.out.numel(),), float(n))
        if self.op == "all_gather":
            return ((torch.arange(n, dtype=torch.float32) + 1) % 256).repeat_interleave(k)
        if self.op == "all_to_all":
            return ((torch.arange(n, dtype=torch.float32) * n + r) % 256).repeat_interleave(k)
        return torch.full((self.out.numel(),), 7.0)

    def count_wrong(self) -> int:
        return int((self.out.float().cpu() != self.expected()).sum())


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    # The *_single names are torch 2.10+; the *_tensor ones (deprecated there) exist since 2.0.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp)


# ----------------------------------------------------------------------------- inside a group


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_collectives(
    ops: list[str],
    sizes: list[int],
    dtype: str = "fp32",
    iters: int = 10,
    warmup: int = 2,
    device: torch.device | None = None,
) -> list[CollectiveResult]:
    """Time each op at each size in the current process group; every rank gets the results."""
    n, rank = dist.get_world_size(), dist.get_rank()
    backend = str(dist.get_backend())
    device = device or torch.device("cpu")
    results = []
    for op in ops:
        bus_factor(op, n)  # validates the name before any communication
        for size in sizes:
            buf = _Buffers(op, size, n, rank, DTYPES[dtype], device)
            buf.fill_pattern()
            buf.run()
            _sync(device)
            wrong = buf.count_wrong()
            buf.inp.zero_()  # repeated all-reduces of zeros stay finite
            for _ in range(warmup):
                buf.run()
            _sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                buf.run()
            _sync(device)
            mean = (time.perf_counter() - t0) / iters
            stats = torch.tensor([mean, float(wrong)], dtype=torch.float64, device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            slowest, wrong_max = float(stats[0]), int(stats[1])
            algbw, busbw = bandwidths(op, buf.size_bytes, slowest, n)
            results.append(
                CollectiveResult(
                    op, buf.size_bytes, n, backend, dtype, slowest * 1e6, algbw, busbw, wrong_max
                )
            )
    return results


def results_table(results: list[CollectiveResult]) -> Table:
    rows = []
    for r in results:
        row = asdict(r)
        row["size"] = human_bytes(r.size_bytes)
        row["factor"] = f"{bus_factor(r.op, r.ranks):.3g}"
        rows.append(row)
    head = results[0] if results else None
    title = "Collectives" + (f" ({head.backend}, {head.ranks} ranks, {head.dtype})" if head else "")
    return Table(
        title,
        ["op", "size", "time_us", "algbw_gbs", "factor", "busbw_gbs", "wrong"],
        rows,
        [
            "algbw = S / t; busbw = algbw x factor (nccl-tests: all-reduce 2(n-1)/n, all-gather, "
            "reduce-scatter and all-to-all (n-1)/n, broadcast 1); GB/s = 10^9 B/s",
            "S: all-gather = gathered output, reduce-scatter = input, all-to-all = one rank's "
            "send buffer; t: slowest rank's mean over the timed iterations",
        ],
    )


# ----------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend nccl needs CUDA devices; use --backend gloo on CPU")
    return backend


def _rank_device(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class CollectiveError(RuntimeError):
    """A spawned rank failed; the message carries the tail of its output."""


def _rank_main() -> None:
    """Entry of one rank started by `spawn_collectives`: measure, write (rank 0), and leave."""
    job = json.loads(os.environ["CRUCIBLE_COLL_JOB"])
    backend, out = job.pop("backend"), job.pop("out")
    device = _rank_device(backend, int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(minutes=5))
    results = run_collectives(device=device, **job)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps([asdict(r) for r in results]))
    # gloo can abort at interpreter exit after destroy: barrier, destroy, flush, os._exit (the
    # rule of crucible.train.distributed.finish).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_collectives(
    nproc: int, backend: str = "auto", timeout_s: float = 600, **params: Any
) -> list[CollectiveResult]:
    """Start `nproc` local ranks as fresh interpreters (torchrun's environment variables, so no
    re-import of the caller's __main__), run `run_collectives`, return rank 0's results."""
    if nproc < 2:
        raise ValueError(f"--nproc must be >= 2 for a collective, got {nproc}")
    backend = pick_backend(backend)
    if backend == "nccl" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} with nccl but only {torch.cuda.device_count()} GPUs")
    code = "from crucible.infra.collectives import _rank_main; _rank_main()"
    with tempfile.TemporaryDirectory(prefix="crucible-coll-") as tmp:
        out = Path(tmp) / "results.json"
        job = json.dumps({"backend": backend, "out": str(out), **params})
        base = os.environ | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(nproc),
            "CRUCIBLE_COLL_JOB": job,
        }
        procs, logs = [], []
        for r in range(nproc):
            log = open(Path(tmp) / f"rank{r}.log", "w+b")  # noqa: SIM115 (closed below)
            env = base | {"RANK": str(r), "LOCAL_RANK": str(r)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
            logs.append(log)
        try:
            failed = _wait_all(procs, timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        if failed is not None:
            tail = (Path(tmp) / f"rank{failed}.log").read_text(errors="replace")[-2000:]
            raise CollectiveError(f"rank {failed} failed:\n{tail}")
        return [CollectiveResult(**r) for r in json.loads(out.read_text())]


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> int | None:
    """Index of the first rank that failed or hung past `timeout_s`; None when all exit 0."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        for i, c in enumerate(codes):
            if c not in (None, 0):
                return i
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.05)
    return next(i for i, p in enumerate(procs) if p.poll() is None)


def torchrun_collectives(backend: str = "auto", **params: Any) -> list[CollectiveResult]:
    """Run inside a `torchrun` launch: join the group from the environment; all ranks return."""
    backend = pick_backend(backend)
    device = _rank_device(backend, int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
    return run_collectives(device=device, **params)


def default_sizes(backend: str) -> str:
    # gloo moves data through host memory and TCP: a few MiB already show its bandwidth.
    return "1M,64M,1G" if backend == "nccl" else "64K,1M,16M"


def default_nproc(backend: str) -> int:
    return max(2, torch.cuda.device_count()) if backend == "nccl" else 2
