"""One timer for every measurement: warm up, then repeat until a time budget or a count is spent."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    median_s: float
    mean_s: float
    min_s: float
    reps: int


def measure(
    fn: Callable[[], object],
    sync: Callable[[], None] | None = None,
    warmup: int = 2,
    min_time_s: float = 0.5,
    min_reps: int = 3,
    max_reps: int = 1000,
) -> Timing:
    """Seconds per call of `fn`. `sync` (e.g. torch.cuda.synchronize) brackets every call so that
    asynchronous work is counted; repetitions stop after `min_time_s` once `min_reps` are done."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_reps and time.perf_counter() - start >= min_time_s:
            break
    return Timing(statistics.median(times), statistics.fmean(times), min(times), len(times))


def parse_size(text: str, flag: str | None = None) -> int:
    """Bytes from '512', '64K', '16M', '1G', '1.5GiB' (binary multiples: K = 1024)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        where = f"{flag} " if flag else ""
        raise ValueError(
            f"{where}cannot read '{text}' as a size (e.g. 4096, 64K, 16M, 1G)"
        ) from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} GiB"
