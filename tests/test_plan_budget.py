"""GPU-days, cost and compute-optimal sizing against the playbook's SmolLM3 arithmetic."""

import math

import pytest

from crucible.config import MoEConfig, load_config
from crucible.plan.budget import (
    SMOLLM3_EXPERIMENT_SHARE,
    BudgetError,
    gpu_days_for_tokens,
    reserve_for_experiments,
    tokens_for_budget,
)
from crucible.plan.flops import train_flops_per_token
from crucible.plan.hardware import find_accelerator
from crucible.plan.kvcache import kv_cache_bytes_per_token
from crucible.plan.params import count_params
from crucible.plan.scaling import HOFFMANN_2022, compute_optimal

H100 = find_accelerator("H100 SXM")


def test_playbook_gpu_count():
    # 6 x 3e9 x 11e12 FLOPs at 720 TFLOP/s x 30% in four weeks: the playbook's ~379 GPUs.
    plan = gpu_days_for_tokens(11e12, 6 * 3e9, H100, 0.30, days=28, peak_tflops=720)
    assert plan.total_flops == pytest.approx(1.98e23)
    assert plan.gpus == 379
    assert "720" in plan.peak_source


def test_smollm3_run_length_at_measured_throughput():
    cfg = load_config("smollm3-3b")
    fpt = train_flops_per_token(cfg.model, 4096)
    mfu = 14_000 * fpt / H100.peak_flops("bf16")  # 14k tokens/s/GPU, the playbook's band
    plan = gpu_days_for_tokens(11e12, fpt, H100, mfu, gpus=384)
    assert plan.days == pytest.approx(11e12 / (14_000 * 384) / 86_400)
    assert 23 < plan.days < 24.5
    assert "989.4" in plan.peak_source  # the output names the dense peak it used


def test_reverse_is_the_inverse_and_cost_scales():
    plan = gpu_days_for_tokens(1e12, 1e10, H100, 0.4, gpus=64, price_per_gpu_hour=2.0)
    assert tokens_for_budget(1e10, H100, 0.4, gpu_hours=plan.gpu_hours) == pytest.approx(1e12)
    assert tokens_for_budget(1e10, H100, 0.4, cost=plan.cost, price_per_gpu_hour=2.0) == (
        pytest.approx(1e12)
    )
    assert plan.cost == pytest.approx(plan.gpu_hours * 2.0)


def test_bad_budgets_are_explained():
    with pytest.raises(BudgetError, match="MFU"):
        gpu_days_for_tokens(1e12, 1e10, H100, 0.0, gpus=8)
    with pytest.raises(BudgetError, match="exactly one"):
        gpu_days_for_tokens(1e12, 1e10, H100, 0.4, gpus=8, days=3)
    with pytest.raises(BudgetError, match="price"):
        tokens_for_budget(1e10, H100, 0.4, cost=1000)


def test_experiment_reserve_is_smollm3s_share():
    main, reserve = reserve_for_experiments(437_000)
    assert reserve == pytest.approx(161_000) and main == pytest.approx(276_000)
    assert pytest.approx(161 / 437) == SMOLLM3_EXPERIMENT_SHARE


def test_compute_optimal_minimises_the_law_on_the_iso_flop_line():
    c = 1e22
    n, d = HOFFMANN_2022.optimal(c)
    assert 6 * n * d == pytest.approx(c)
    grid = [n * math.exp(x / 50) for x in range(-100, 101)]
    best = min(grid, key=lambda m: HOFFMANN_2022.loss(m, c / (6 * m)))
    assert best == pytest.approx(n, rel=0.03)
    n20, d20 = compute_optimal(c)
    assert d20 / n20 == pytest.approx(20) and 6 * n20 * d20 == pytest.approx(c)


def test_llama_split_kv_cache_and_moe_counts():
    cfg = load_config("llama3.2-1b-ablation").model
    shares = count_params(cfg).shares()
    assert round(shares["embedding"], 2) == 0.21 and round(shares["mlp"], 2) == 0.65
    # Llama-3.2-1B: 16 layers x 8 KV heads x 64 dims x (K and V) x 2 bytes.
    assert kv_cache_bytes_per_token(cfg) == 16 * 8 * 64 * 2 * 2
    dense = count_params(cfg)
    moe = count_params(
        cfg, MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=cfg.intermediate_size // 4)
    )
    expert = 3 * cfg.hidden_size * (cfg.intermediate_size // 4)
    router = cfg.hidden_size * 8
    assert moe.total == dense.total - dense.mlp + cfg.num_layers * (8 * expert + router)
    assert moe.active == dense.total - dense.mlp + cfg.num_layers * (2 * expert + router)
    assert train_flops_per_token(
        cfg,
        4096,
        MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=cfg.intermediate_size // 4),
    ) < (train_flops_per_token(cfg, 4096))
