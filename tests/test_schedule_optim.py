import math

import pytest
import torch

from crucible.config import OptimConfig, ScheduleConfig
from crucible.train.optim import param_groups
from crucible.train.schedule import lr_at


def test_warmup_is_linear_and_reaches_peak():
    cfg = ScheduleConfig(kind="constant", warmup_steps=10)
    lrs = [lr_at(s, 100, 1.0, cfg) for s in range(12)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[11] == 1.0


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_cosine_and_linear_end_at_min(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=10, min_lr=0.1)
    assert lr_at(10, 110, 1.0, cfg) == pytest.approx(1.0)
    assert lr_at(109, 110, 1.0, cfg) == pytest.approx(0.1)
    mid = lr_at(10 + 99 // 2, 110, 1.0, cfg)
    expected = 0.1 + 0.9 * (
        0.5 * (1 + math.cos(math.pi * 49 / 99)) if kind == "cosine" else 50 / 99
    )
    assert mid == pytest.approx(expected)


def test_wsd_stable_then_decays_over_fraction():
    # SmolLM3: warmup, constant, then the last ~11% of steps decay linearly to 0.
    cfg = ScheduleConfig(kind="wsd", warmup_steps=20, decay_fraction=0.1, decay_shape="linear")
    lrs = [lr_at(s, 200, 2.0, cfg) for s in range(200)]
    assert all(lr == 2.0 for lr in lrs[20:180])
    assert lrs[-1] == pytest.approx(0.0)
    decay = lrs[180:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[9] == pytest.approx(2.0 * (1 - 10 / 20))


def test_wsd_sqrt_shape():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=0, decay_fraction=0.5, decay_shape="sqrt")
    assert lr_at(74, 100, 1.0, cfg) == pytest.approx(1 - math.sqrt(25 / 50))


def test_weight_decay_exclusions():
    model = torch.nn.ModuleDict(
        {
            "emb": torch.nn.Embedding(10, 4),
            "lin": torch.nn.Linear(4, 4),
            "norm": torch.nn.LayerNorm(4),
        }
    )
    groups = param_groups(model, OptimConfig(weight_decay=0.1, decay_embeddings=False))
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model["lin"].weight)}
    assert groups[1]["weight_decay"] == 0.0
    groups = param_groups(model, OptimConfig(weight_decay=0.1, decay_embeddings=True))
    assert {id(p) for p in groups[0]["params"]} == {
        id(model["lin"].weight),
        id(model["emb"].weight),
    }
