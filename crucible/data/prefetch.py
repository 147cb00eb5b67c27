"""Background prefetch for loaders whose batches are a pure function of the step.

While step s computes, one worker thread builds step s+1's batches (reading shards, building
doc ids, pinning host memory for an asynchronous copy to the GPU). The loader's own position
(`loader.step`, what checkpoints record) moves only when a step's batches are taken, so a
checkpoint never counts a prefetched step, and a prefetch for a step the run no longer wants
(a rollback or a resume moved `loader.step`) is discarded.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Prefetcher:
    def __init__(self, build: Callable[[int], list[Any]], pin_memory: bool = False) -> None:
        self._build = build
        self._pin = pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crucible-prefetch")
        self._pending: tuple[int, Future] | None = None

    def _make(self, step: int) -> list[Any]:
        batches = self._build(step)
        return [b.pin_memory() for b in batches] if self._pin else batches

    def take(self, step: int) -> list[Any]:
        """Step `step`'s batches: the prefetched ones when they are for this step."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            return pending[1].result()
        if pending is not None and not pending[1].cancel():
            # Already running: let it finish first, so the loader's caches (permutations) are
            # never touched by two threads at once. Its result, or error, is not wanted.
            pending[1].exception()
        return self._make(step)

    def start(self, step: int) -> None:
        self._pending = (step, self._pool.submit(self._make, step))

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
