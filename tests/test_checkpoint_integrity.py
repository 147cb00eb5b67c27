"""Verified, durable checkpoints: every damage is detected and named, loading falls back to the
newest intact checkpoint, leftovers are cleaned, retention keeps milestones, a full disk or a
NaN never costs an intact checkpoint, and no read path unpickles what it is pointed at."""

import errno
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import crucible.train.checkpoint as ckpt
from crucible.config import load_config
from crucible.runs import resolve_checkpoint
from crucible.train.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    NonFiniteCheckpointError,
    clean_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    step_dir,
    verify_checkpoint,
)
from crucible.train.trainer import train


def _model_opt(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _series(root: Path, steps: list[int], keep_last: int = 10, **kw) -> tuple[nn.Module, ...]:
    """Checkpoints at `steps` of one small model, one optimizer step apart."""
    model, opt = _model_opt()
    for s in steps:
        _train_step(model, opt)
        save_checkpoint(root, s, model, opt, {"world_size": 1}, keep_last, **kw)
    return model, opt


def _files(ckpt_dir: Path) -> list[str]:
    return sorted(p.relative_to(ckpt_dir).as_posix() for p in ckpt_dir.rglob("*") if p.is_file())


def _flip_mid(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = max(0, len(data) // 2 - n // 2)
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _latest_with_warnings(root: Path) -> tuple[Path | None, list[str]]:
    lines: list[str] = []
    return latest_checkpoint(root, warn=lines.append), lines


# --------------------------------------------------------------------------- the manifest


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    _series(tmp_path, [1])
    d = step_dir(tmp_path, 1)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["algorithm"] == "sha256" and manifest["step"] == 1
    others = [f for f in _files(d) if f != "manifest.json"]
    assert sorted(manifest["files"]) == others
    for rel, entry in manifest["files"].items():
        data = (d / rel).read_bytes()  # reference: hashlib over the bytes on disk
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert json.loads((d / "state.json").read_text())["format"] == 2
    assert verify_checkpoint(d) == [] and not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- damage, file by file


def _damage_cases(d: Path) -> list[tuple[str, str]]:
    files = _files(d)
    assert {"model.safetensors", "manifest.json", "state.json", "optimizer.json"} <= set(files)
    cases = [("delete", f) for f in files] + [("flip", f) for f in files]
    cases += [("truncate", f) for f in files]
    return cases + [("replace", "model.safetensors"), ("extra", "notes.txt")]


def _apply(kind: str, d: Path, rel: str, older: Path) -> None:
    path = d / rel
    if kind == "delete":
        path.unlink()
    elif kind == "flip":
        _flip_mid(path)
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "replace":  # a different valid safetensors file of exactly the same size
        shutil.copyfile(older / rel, path)
        assert path.stat().st_size == (older / rel).stat().st_size
    else:
        path.write_text("an unexpected file")


def test_every_damage_to_every_file_is_detected_named_and_skipped(tmp_path):
    """Delete, flip 16 bytes mid-file, truncate: each file in turn; plus a same-size valid
    replacement of the weights and an extra file. 100% detected, one warning line naming the
    damaged file, and latest_checkpoint falls back to the previous intact checkpoint."""
    base = tmp_path / "base"
    _series(base, [1, 2])
    cases = _damage_cases(step_dir(base, 2))
    assert len(cases) >= 20
    for i, (kind, rel) in enumerate(cases):
        root = tmp_path / f"case{i}"
        shutil.copytree(base, root)
        d = step_dir(root, 2)
        _apply(kind, d, rel, step_dir(root, 1))
        problems = verify_checkpoint(d)
        assert problems and problems[0].startswith(f"{rel}: "), (kind, rel, problems)
        found, lines = _latest_with_warnings(root)
        assert found == step_dir(root, 1), (kind, rel)
        assert len(lines) == 1 and "\n" not in lines[0], (kind, rel, lines)
        assert str(d) in lines[0] and f"{rel}: " in lines[0], (kind, rel, lines)
        assert [s for s, _ in list_checkpoints(root, verify="hash", warn=lambda m: None)] == [1]


def test_size_verification_catches_structure_but_not_flipped_bytes(tmp_path):
    _series(tmp_path, [1])
    d = step_dir(tmp_path, 1)
    _flip_mid(d / "model.safetensors")
    assert verify_checkpoint(d, "size") == []  # the documented cost trade-off
    assert verify_checkpoint(d, "hash") == ["model.safetensors: sha256 mismatch (contents changed)"]
    (d / "optimizer.json").write_text("{}")
    assert verify_checkpoint(d, "size")[0].startswith("optimizer.json: 2 bytes, the manifest says")


def test_default_warning_category_and_legacy_checkpoints(tmp_path):
    _series(tmp_path, [1, 2])
    _flip_mid(step_dir(tmp_path, 2) / "model.safetensors")
    with pytest.warns(CheckpointWarning, match="step_000002: model.safetensors: sha256 mismatch"):
        assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    # A format-1 checkpoint (before manifests) is accepted, with a warning that it is unverified.
    old = step_dir(tmp_path, 1)
    (old / "manifest.json").unlink()
    state = json.loads((old / "state.json").read_text())
    (old / "state.json").write_text(json.dumps({**state, "format": 1}))
    found, lines = _latest_with_warnings(tmp_path)
    assert found == old and "unverified" in lines[-1]
    (old / "rng.safetensors").unlink()  # its layout's files must still all be there
    assert verify_checkpoint(old) == ["rng.safetensors: missing"]


def test_named_damaged_checkpoint_is_an_error_for_read_paths(tmp_path):
    _series(tmp_path / "checkpoints", [1, 2])
    _flip_mid(tmp_path / "checkpoints" / "step_000002" / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="optimizer.safetensors: sha256 mismatch"):
        resolve_checkpoint(tmp_path, "step_000002")
    with pytest.warns(CheckpointWarning, match="optimizer.safetensors"):
        assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000001"


# --------------------------------------------------------------------------- leftovers, retention


def test_stale_tmp_and_killed_prune_are_ignored_then_cleaned(tmp_path):
    model, opt = _series(tmp_path, [1, 2, 3])
    stale = tmp_path / "step_000004.tmp"  # a save killed mid-write
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    partial = step_dir(tmp_path, 3)  # a prune killed by an older version: files half deleted
    (partial / "model.safetensors").unlink()
    (partial / "manifest.json").unlink()
    deleting = tmp_path / "step_000001.deleting"  # a prune killed between rename and rmtree
    step_dir(tmp_path, 1).rename(deleting)
    found, lines = _latest_with_warnings(tmp_path)
    assert found == step_dir(tmp_path, 2) and "step_000003: manifest.json: missing" in lines[0]
    removed: list[str] = []
    cleaned = clean_checkpoints(tmp_path, warn=removed.append)
    assert sorted(p.name for p in cleaned) == [
        "step_000001.deleting",
        "step_000003",
        "step_000004.tmp",
    ]
    assert len(removed) == 1 and "incomplete checkpoint" in removed[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]
    # A save also starts by removing leftovers.
    stale.mkdir()
    save_checkpoint(tmp_path, 5, model, opt, {"world_size": 1}, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000005"]


def test_retention_keeps_the_last_n_and_every_milestone(tmp_path):
    steps, keep_last, every = list(range(1, 11)), 2, 4
    _series(tmp_path, steps, keep_last=keep_last, milestone_every=every)
    expected = sorted(set(steps[-keep_last:]) | {s for s in steps if s % every == 0})
    assert [s for s, _ in list_checkpoints(tmp_path)] == expected == [4, 8, 9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_{s:06d}" for s in expected]


def test_a_kill_during_prune_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    model, opt = _series(tmp_path, [1, 2], keep_last=2)
    import crucible.train.checkpoint_store as store

    def killed(path, *a, **k):  # the process dies while deleting the doomed directory
        first = next(Path(path).iterdir())
        first.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(store.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, opt, {"world_size": 1}, 2)
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_000001.deleting", "step_000002", "step_000003"]
    assert [s for s, _ in list_checkpoints(tmp_path, verify="hash")] == [2, 3]
    save_checkpoint(tmp_path, 4, model, opt, {"world_size": 1}, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]


# --------------------------------------------------------------------------- refusing to write


def test_non_finite_weights_or_optimizer_state_are_never_written(tmp_path):
    model, opt = _series(tmp_path, [1])
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=r"model 2\.weight holds non-finite") as e:
        save_checkpoint(tmp_path, 2, model, opt, {"world_size": 1}, 5)
    assert e.value.step == 2 and e.value.tensor == "model 2.weight"
    model, opt = _model_opt()
    _train_step(model, opt)
    opt.state[model[1].bias]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match="optimizer exp_avg_sq of 1.bias"):
        save_checkpoint(tmp_path, 2, model, opt, {"world_size": 1}, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    assert verify_checkpoint(step_dir(tmp_path, 1)) == []


def test_full_disk_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt = _series(tmp_path, [1])
    real = ckpt.save_file
    calls = []

    def disk_full(tensors, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:  # the optimizer file: half written, then no space left
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    _train_step(model, opt)
    with pytest.raises(OSError, match="checkpoint step 2 not written .No space left") as e:
        save_checkpoint(tmp_path, 2, model, opt, {"world_size": 1}, 5)
    assert e.value.errno == errno.ENOSPC and "earlier checkpoints are intact" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    assert verify_checkpoint(step_dir(tmp_path, 1)) == []
    fresh, fresh_opt = _model_opt(seed=1)
    load_checkpoint(step_dir(tmp_path, 1), fresh, fresh_opt)  # and it still loads


# --------------------------------------------------------------------------- no unpickling


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_read_paths_never_unpickle_a_crafted_dcp_directory(tmp_path):
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "checkpoints" / "step_000001"
    (bad / "dcp").mkdir(parents=True)
    (bad / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (bad / "state.json").write_text(json.dumps({"format": 1, "step": 1, "world_size": 2}))
    model, _ = _model_opt()
    with pytest.raises(CheckpointError, match="no model.safetensors: a sharded checkpoint"):
        load_model_weights(bad, model)
    # The restricted reader used by --resume refuses the payload's global instead of running it.
    from crucible.train.checkpoint_dcp import load_dcp_metadata

    with pytest.raises(pickle.UnpicklingError, match="refusing builtins.exec"):
        load_dcp_metadata((bad / "dcp" / ".metadata").read_bytes())
    assert not marker.exists()


def test_restricted_dcp_reader_round_trips_a_real_sharded_checkpoint(tmp_path):
    """What resume reads: a real DCP index and optimizer hyperparameters, through SafeReader and
    SafeLoadPlanner, give back exactly what was saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from crucible.train.checkpoint_dcp import SafeLoadPlanner, SafeReader

    model, opt = _model_opt()
    _train_step(model, opt)
    msd, osd = get_state_dict(model, opt)
    with pytest.warns(UserWarning):  # "no process group": one process, on purpose
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path), no_dist=True)
    fresh, fresh_opt = _model_opt(seed=3)
    _train_step(fresh, fresh_opt)
    fresh_opt.param_groups[0]["lr"] = 0.5
    fm, fo = get_state_dict(fresh, fresh_opt)
    sd = {"model": fm, "optim": fo}
    with pytest.warns(UserWarning):
        dcp.load(
            sd, storage_reader=SafeReader(str(tmp_path)), planner=SafeLoadPlanner(), no_dist=True
        )
    for k, v in msd.items():
        assert torch.equal(sd["model"][k], v), k
    assert sd["optim"]["param_groups"][0]["lr"] == 1e-2
    first = next(iter(osd["state"]))
    assert torch.equal(sd["optim"]["state"][first]["exp_avg"], osd["state"][first]["exp_avg"])


# --------------------------------------------------------------------------- training resumes


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_base):
    """A 6-step run with checkpoints at 2, 4 and 6 (the final one)."""
    runs = tmp_path_factory.mktemp("integrity-runs")
    common = [*small_base, f"out_dir={runs}", "train.steps=6", "checkpoint.every=2",
              "checkpoint.keep_last=3", "train.val_every=0", "train.log_every=1",
              "train.dtype=fp32", "schedule.warmup_steps=1"]  # fmt: skip
    cfg = load_config("tiny", [*common, "name=reference"])
    train(cfg, quiet=True)
    return runs, common


def _damage_run(run: Path, kind: str) -> None:
    ckpts = run / "checkpoints"
    six, four = step_dir(ckpts, 6), step_dir(ckpts, 4)
    if kind == "flip":
        _flip_mid(six / "model.safetensors")
    elif kind == "truncate":
        p = six / "optimizer.safetensors"
        p.write_bytes(p.read_bytes()[:100])
    elif kind == "replace":
        shutil.copyfile(four / "model.safetensors", six / "model.safetensors")
    else:  # killed prune of step 6 (files half deleted) next to a stale .tmp and a .deleting
        (six / "rng.safetensors").unlink()
        (six / "manifest.json").unlink()
        (ckpts / "step_000008.tmp").mkdir()
        shutil.copytree(step_dir(ckpts, 2), ckpts / "step_000002.deleting")


@pytest.mark.parametrize("kind", ["flip", "truncate", "replace", "leftovers"])
def test_training_resumes_from_the_previous_intact_checkpoint(reference_run, kind):
    runs, common = reference_run
    run = runs / kind
    shutil.copytree(runs / "reference", run)
    _damage_run(run, kind)
    with pytest.warns(CheckpointWarning, match="step_000006"):
        result = train(load_config("tiny", [*common, f"name={kind}"]), resume=True, quiet=True)
    assert result.step == 6
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["event"] == "resume"]
    assert resumes[-1] == {**resumes[-1], "step": 4, "checkpoint": "step_000004"}
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    ref = load_file(str(runs / "reference/checkpoints/step_000006/model.safetensors"))
    got = load_file(str(run / "checkpoints/step_000006/model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000004", "step_000006"]
    assert all(verify_checkpoint(run / "checkpoints" / n) == [] for n in names)
