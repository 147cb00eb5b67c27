"""Muon (+ AdamW for the rest): parameter split, equality with torch.optim.Muon, bit-exact
resume, and two CPU ranks (DDP, FSDP2 with gathered orthogonalisation) against one process."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crucible.config import ConfigError, ModelConfig, OptimConfig, load_config
from crucible.model import Transformer
from crucible.train.muon import MuonWithAdamW
from crucible.train.optim import build_optimizer, muon_params, param_groups
from crucible.train.trainer import train

SMALL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, max_seq_len=16, tie_embeddings=False,
                    attention_bias=True)  # fmt: skip


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(SMALL)


def _loss(model: Transformer, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, SMALL.vocab_size, (4, 16), generator=g)
    return model(x[:, :-1], x[:, 1:]).loss


def test_muon_takes_hidden_matrices_adamw_the_rest():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    adamw = sorted(names[id(p)] for g in opt.adamw.param_groups for p in g["params"])
    assert all(n.endswith("_proj.weight") for n in muon) and len(muon) == 2 * 7
    assert {"embed.weight", "lm_head.weight", "norm.weight"} <= set(adamw)
    assert all(n.endswith(("norm.weight", "bias")) or n in ("embed.weight", "lm_head.weight")
               for n in adamw)  # fmt: skip
    assert len(muon) + len(adamw) == len(names)
    assert opt.param_groups == [*opt.muon.param_groups, *opt.adamw.param_groups]


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_matches_torch_muon_plus_adamw(adjust):
    """Bit for bit the same as a torch.optim.Muon and a torch.optim.AdamW stepped side by side,
    with the trainer's way of setting one scheduled LR in every group."""
    cfg = OptimConfig(name="muon", lr=0.01, weight_decay=0.1,
                      muon={"adjust_lr": adjust, "lr": 0.01 if adjust == "original" else None})  # fmt: skip
    ours_model, ref_model = _model(), _model()
    ours = build_optimizer(ours_model, cfg, torch.device("cpu"))
    hidden = muon_params(ref_model)
    ref_muon = torch.optim.Muon(hidden, lr=0.01, weight_decay=0.1, adjust_lr_fn=adjust)
    rest = param_groups(ref_model, cfg, exclude={id(p) for p in hidden})
    ref_adamw = torch.optim.AdamW(rest, lr=0.01, betas=cfg.betas, eps=cfg.eps)
    for step in range(4):
        lr = 0.01 * (step + 1) / 4  # a changing schedule
        for group in [*ours.param_groups, *ref_muon.param_groups, *ref_adamw.param_groups]:
            group["lr"] = lr
        for model in (ours_model, ref_model):
            _loss(model, step).backward()
        ours.step()
        ref_muon.step()
        ref_adamw.step()
        ours.zero_grad()
        ref_muon.zero_grad()
        ref_adamw.zero_grad()
    for (name, a), b in zip(ours_model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_lr_scale_follows_the_schedule():
    model = _model()
    cfg = OptimConfig(name="muon", lr=1e-3, muon={"lr": 0.02, "adjust_lr": "original"})
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert opt.muon.param_groups[0]["lr_scale"] == pytest.approx(20)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for g in opt.param_groups:
        g["lr"] = 0.0
    _loss(model, 0).backward()
    opt.step()
    for n, p in model.named_parameters():  # LR 0 from the schedule: nothing moves
        assert torch.equal(p, before[n]), n


def test_state_dict_round_trip_continues_exactly():
    cfg = OptimConfig(name="muon")
    a_model = _model()
    a = build_optimizer(a_model, cfg, torch.device("cpu"))
    for step in range(2):
        _loss(a_model, step).backward()
        a.step()
        a.zero_grad()
    b_model = _model(seed=1)
    b_model.load_state_dict(a_model.state_dict())
    b = build_optimizer(b_model, cfg, torch.device("cpu"))
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # a copy: tensors are shared otherwise
    assert b.muon.state is b.state and b.muon.param_groups[0] is b.param_groups[0]
    for model, opt in ((a_model, a), (b_model, b)):
        _loss(model, 5).backward()
        opt.step()
    for (name, p), q in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.equal(p, q), name


def test_config_errors():
    with pytest.raises(ConfigError, match="optim.name"):
        load_config("tiny", ["optim.name=lion"])
    with pytest.raises(ConfigError, match="muon.lr is required with muon.adjust_lr=original"):
        load_config("tiny", ["optim.name=muon", "optim.muon.adjust_lr=original"])
    with pytest.raises(ConfigError, match="optim.muon.momentum"):
        load_config("tiny", ["optim.name=muon", "optim.muon.momentum=1.5"])


def test_trainer_resume_with_muon_is_bit_exact(small_overrides):
    """Train 6 steps; train 3, save, resume to 6: identical weights (checkpoints hold the
    momentum buffers and AdamW moments through the generic optimizer-state flattening)."""
    common = [*small_overrides, "optim.name=muon", "train.steps=6", "train.val_every=0",
              "train.dtype=fp32", "checkpoint.every=3", "schedule.warmup_steps=2"]  # fmt: skip
    full = train(load_config("tiny", [*common, "name=full"]), quiet=True)
    train(load_config("tiny", [*common, "name=split", "train.stop_at=3"]), quiet=True)
    split = train(load_config("tiny", [*common, "name=split"]), resume=True, quiet=True)
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(split.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    saved = json.loads((full.checkpoint / "optimizer.json").read_text())
    assert any("lr_scale" in g for g in saved["param_groups"])
    assert any(k.endswith("momentum_buffer") for k in load_file(
        str(full.checkpoint / "optimizer.safetensors")))  # fmt: skip


# --------------------------------------------------------------------------- two ranks


def _run(args: list[str], nproc: int) -> None:
    if nproc == 1:
        cmd = [sys.executable, "-m", "crucible", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "crucible", "train", *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_match_single_process_with_muon(tmp_path, small_base):
    """DDP (full matrices on every rank) and FSDP2 (row shards, gathered for Newton-Schulz),
    and an FSDP2 run resumed from its sharded checkpoint."""
    base = [*small_base, f"out_dir={tmp_path}", "optim.name=muon", "train.steps=5",
            "train.log_every=1", "train.val_every=0", "train.dtype=fp32", "checkpoint.every=0",
            "schedule.warmup_steps=2", "train.threads=1"]  # fmt: skip
    _run(["tiny", *base, "name=single"], 1)
    ref = _losses(tmp_path / "single")
    assert len(ref) == 5 and ref[-1] < ref[0]
    for strategy in ("ddp", "fsdp"):
        _run(["tiny", *base, f"name={strategy}", f"distributed.strategy={strategy}"], 2)
        got = _losses(tmp_path / strategy)
        assert len(got) == 5
        for a, b in zip(ref, got):
            assert abs(a - b) / abs(a) < 1e-5, (strategy, ref, got)
    # A sharded (DCP) checkpoint of the Muon + AdamW state resumes to the same losses.
    split = [*base, "name=split", "distributed.strategy=fsdp", "checkpoint.every=3"]
    _run(["tiny", *split, "train.stop_at=3"], 2)
    _run(["tiny", *split, "--resume"], 2)
    assert _losses(tmp_path / "split") == pytest.approx(_losses(tmp_path / "fsdp"), rel=1e-6)
