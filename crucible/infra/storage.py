"""Storage: sequential read throughput of a directory, and a checkpoint round trip on it.

Nothing is dropped from the OS page cache (that needs root and disturbs other jobs): files read
recently may be served from memory, so a figure far above the device's rating is the cache's.
`write_test_file` writes a fresh file of a chosen size; one larger than the machine's memory
cannot be cached whole, so reading it back measures the storage.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

BLOCK = 8 << 20  # bytes per read/write call: large enough that syscalls do not dominate
TEST_PREFIX = "crucible-bench-"


class StorageError(ValueError):
    """A directory that cannot be used; the message is one line for the user."""


def check_dir(path: str | Path, writable: bool = False) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such directory")
    if not p.is_dir():
        raise StorageError(f"{p} is not a directory")
    if writable:
        try:
            fd, probe = tempfile.mkstemp(prefix=".crucible-probe-", dir=p)
        except OSError as e:
            raise StorageError(f"{p} is not writable ({e.strerror or e})") from None
        os.close(fd)
        os.unlink(probe)
    return p


@dataclass
class Throughput:
    what: str
    files: int
    bytes: int
    seconds: float

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def read_throughput(root: str | Path, limit_bytes: int | None = None) -> Throughput:
    """Read every regular file under `root` in path order, one after the other, up to
    `limit_bytes` in all; MB/s = bytes / wall time (10^6 bytes)."""
    root = check_dir(root)
    files = _files(root)
    if not files:
        raise StorageError(f"{root} holds no files to read")
    return _read_files(f"read {root}", files, limit_bytes)


def read_throughput_file(path: Path) -> Throughput:
    return _read_files(f"read {path.name}", [path], None)


def _read_files(what: str, files: list[Path], limit_bytes: int | None) -> Throughput:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total, n = 0, 0
    t0 = time.perf_counter()
    for f in files:
        if limit_bytes is not None and total >= limit_bytes:
            break
        n += 1
        with open(f, "rb", buffering=0) as fh:
            while limit_bytes is None or total < limit_bytes:
                got = fh.readinto(view)
                if not got:
                    break
                total += got
    return Throughput(what, n, total, time.perf_counter() - t0)


def write_test_file(root: str | Path, size: int) -> tuple[Path, Throughput]:
    """A fresh file of `size` random-looking bytes in `root`, fsynced; returns it and the write
    throughput. The caller deletes it."""
    root = check_dir(root, writable=True)
    if size < 1:
        raise StorageError(f"--size must be positive, got {size}")
    block = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    fd, name = tempfile.mkstemp(prefix=TEST_PREFIX, suffix=".bin", dir=root)
    path = Path(name)
    t0 = time.perf_counter()
    try:
        with os.fdopen(fd, "wb", buffering=0) as fh:
            left = size
            while left > 0:
                left -= fh.write(block[: min(left, BLOCK)])
            os.fsync(fh.fileno())  # count the time to reach the device, not just the cache
    except OSError as e:
        path.unlink(missing_ok=True)
        raise StorageError(f"writing {path} failed: {e.strerror or e}") from None
    return path, Throughput(f"write {path.name}", 1, size, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- checkpoint trip


@dataclass
class RoundTrip:
    bytes: int
    write_s: float
    read_s: float
    tensors: int
    mismatched: list[str]

    @property
    def identical(self) -> bool:
        return not self.mismatched

    @property
    def write_mb_s(self) -> float:
        return self.bytes / self.write_s / 1e6

    @property
    def read_mb_s(self) -> float:
        return self.bytes / self.read_s / 1e6


def _model(width: int, layers: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Compare the bytes, not the values: NaN != NaN and -0.0 == 0.0 would mislead either way.
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        out |= {f"optim.{idx}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)}
    return out


def checkpoint_roundtrip(root: str | Path, width: int = 1024, layers: int = 4) -> RoundTrip:
    """Save a small model + AdamW state with crucible.train.checkpoint under `root`, load it into
    a differently initialised copy, compare every tensor bit for bit, and delete it."""
    from crucible.train.checkpoint import load_checkpoint, save_checkpoint

    root = check_dir(root, writable=True)
    # Seeding the models and loading the checkpoint both move the global RNGs: put them back.
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    model, opt = _model(width, layers, seed=1)
    model(torch.randn(2, width)).square().mean().backward()
    opt.step()  # gives the optimizer state (exp_avg, exp_avg_sq, step) to save
    saved = {k: v.clone() for k, v in _tensors(model, opt).items()}
    work = Path(tempfile.mkdtemp(prefix=TEST_PREFIX + "ckpt-", dir=root))
    try:
        t0 = time.perf_counter()
        ckpt = save_checkpoint(work, 1, model, opt, {"world_size": 1, "doctor": True}, 1)
        _fsync_tree(ckpt)
        write_s = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in _files(ckpt))
        fresh, fresh_opt = _model(width, layers, seed=2)
        t0 = time.perf_counter()
        load_checkpoint(ckpt, fresh, fresh_opt)
        read_s = time.perf_counter() - t0
        got = _tensors(fresh, fresh_opt)
        bad = [k for k, v in saved.items() if k not in got or not _bits_equal(v, got[k])]
        bad += [k for k in got if k not in saved]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
    return RoundTrip(nbytes, write_s, read_s, len(saved), bad)


def _fsync_tree(root: Path) -> None:
    for f in _files(root):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
