"""The `checkpoints/` directory: which checkpoints are intact, leftovers, crash-safe pruning.

- `step_N/`: a checkpoint, intact when it matches its manifest (see checkpoint_manifest).
- `step_N.tmp/`: a save in progress, or one interrupted by a crash: removed at the next save.
- `step_N.deleting/`: a checkpoint being pruned (renamed first, then deleted, so a kill during
  the prune never leaves a partial `step_N/`): removed at the next save.

Damaged checkpoints are skipped with a warning, one line naming the file and what is wrong.
Retention keeps the newest `keep_last` plus every `milestone_every`-th step.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

from crucible.train import chaos
from crucible.train.checkpoint_manifest import (
    Problem,
    Verify,
    Warn,
    check_checkpoint,
    fsync_path,
    is_legacy,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^step_\d+\.(tmp|deleting)$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, removed, or loaded without verification."""


def default_warn(message: str) -> None:
    warnings.warn(message, CheckpointWarning, stacklevel=3)


def step_dir(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / f"step_{step:06d}"


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """Every `step_N` directory, oldest first, whatever its state."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    found = []
    for p in checkpoints.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _describe(problems: list[Problem]) -> str:
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def _verify_mode(verify: Verify | bool) -> Verify:
    if verify is True:
        return "hash"
    if verify is False:
        return "none"
    if verify not in ("none", "size", "hash"):
        raise ValueError(f"verify must be 'hash', 'size' or 'none', got {verify!r}")
    return verify


def list_checkpoints(
    checkpoints: Path, verify: Verify | bool = "size", warn: Warn | None = None
) -> list[tuple[int, Path]]:
    """Intact checkpoints as (step, path), oldest first; damaged ones are skipped with a warning.

    verify="size" (the default) stats every file: it catches missing, truncated and extra files
    without reading them. "hash" also reads every byte of every checkpoint (SHA-256, up to ~2 GB/s
    per core: seconds per GB, so minutes for a large run's retained checkpoints). "none" only
    requires a readable state.json.
    """
    mode = _verify_mode(verify)
    warn = warn or default_warn
    out = []
    for step, p in _step_dirs(checkpoints):
        problems = check_checkpoint(p, mode)
        if problems:
            warn(f"skipping damaged checkpoint {p}: {_describe(problems)}")
        else:
            out.append((step, p))
    return out


def latest_checkpoint(
    checkpoints: Path, verify: Verify | bool = "hash", warn: Warn | None = None
) -> Path | None:
    """The newest intact checkpoint, or None. Each newer damaged one is skipped with a warning
    naming the damaged file; a checkpoint from before manifests (format 1) is returned with a
    warning that it is unverified.

    The default verify="hash" reads every byte of the checkpoint it returns (up to ~2 GB/s per
    core); pass "size" to trade the detection of flipped bytes for a stat per file.
    """
    mode = _verify_mode(verify)
    warn = warn or default_warn
    for _, p in reversed(_step_dirs(checkpoints)):
        problems = check_checkpoint(p, mode)
        if problems:
            warn(f"skipping damaged checkpoint {p}: {_describe(problems)}; trying an older one")
            continue
        if mode != "none" and is_legacy(p):
            warn(f"checkpoint {p} predates manifests (format 1): loading it unverified")
        return p
    return None


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory crash-safely: rename it out of the `step_N` namespace first."""
    doomed = path.with_name(path.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    fsync_path(path.parent)
    chaos.point("prune")  # a kill mid-prune (chaos tests)
    shutil.rmtree(doomed)


def clean_checkpoints(checkpoints: Path, warn: Warn | None = None) -> list[Path]:
    """Remove leftovers: `step_N.tmp` (an interrupted save), `step_N.deleting` (an interrupted
    prune) and incomplete `step_N` directories (a file of the manifest missing, no manifest, no
    state.json: what a prune killed by an older version leaves). Damaged but complete ones
    (wrong size or hash, extra file) are kept for inspection; loading skips them.

    Call it on one process (rank 0) only, with no save in flight. Returns the removed paths.
    """
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    warn = warn or default_warn
    removed = []
    for p in sorted(checkpoints.iterdir()):
        if _LEFTOVER.match(p.name):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    for _, p in _step_dirs(checkpoints):
        missing = [x for x in check_checkpoint(p, "size") if x.kind in ("missing", "unreadable")]
        if missing:
            warn(f"removing incomplete checkpoint {p}: {_describe(missing)}")
            remove_dir(p)
            removed.append(p)
    return removed


def prune_checkpoints(
    checkpoints: Path, current: int, keep_last: int, milestone_every: int = 0
) -> list[Path]:
    """Retention after saving step `current`: keep the newest `keep_last` intact checkpoints up
    to `current` and every `milestone_every`-th step; remove the other ones up to `current`.

    Checkpoints after `current` (left by an attempt that was resumed from an earlier one) are
    not touched: the run overwrites them when it gets there. "Intact" is judged by size here.
    """
    dirs = [(s, p) for s, p in _step_dirs(checkpoints) if s <= current]
    intact = [s for s, p in dirs if not check_checkpoint(p, "size")]
    keep = set(intact[-keep_last:]) if keep_last > 0 else set()
    if milestone_every:
        keep |= {s for s in intact if s % milestone_every == 0}
    removed = []
    for s, p in dirs:
        if s not in keep:
            remove_dir(p)
            removed.append(p)
    return removed
