"""The accelerator table and the roofline, against the playbook's derived figures and today's
measured H100 numbers (docs/benchmarks.md)."""

import pytest

from crucible.plan import roofline as rl
from crucible.plan.hardware import (
    ACCELERATORS,
    UnknownAcceleratorError,
    find_accelerator,
    gbps_to_gbs,
    lookup_accelerator,
    pcie_bandwidth_gbs,
)


def test_trainer_api_reads_dense_bf16_peak():
    acc = lookup_accelerator("NVIDIA H100 80GB HBM3")
    assert acc is not None and acc.name == "H100 SXM"
    assert acc.bf16_dense_tflops == 989.4  # NVIDIA's dense bf16 figure for the SXM part
    assert lookup_accelerator("cpu") is None


def test_measured_h100_is_below_its_table_ceilings():
    acc = find_accelerator("h100")
    # docs/benchmarks.md: bf16 matmul 8192^3 745 TFLOP/s, d2d copy 2,954 GB/s (read + written).
    assert 0.7 < 745 / acc.bf16_dense_tflops < 0.8
    assert acc.memory_bw_gbs > 2954


def test_sparse_figures_are_separate_and_never_below_dense():
    for acc in ACCELERATORS:
        assert "bf16" in acc.dense_tflops
        for dtype, sparse in acc.sparse_tflops.items():
            assert sparse == 2 * acc.dense_tflops[dtype]
        assert acc.peak_flops("bf16") == acc.dense_tflops["bf16"] * 1e12


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownAcceleratorError) as e:
        find_accelerator("H1000")
    for acc in ACCELERATORS:
        assert acc.name in str(e.value)


def test_aliases_resolve():
    assert find_accelerator("A100-80GB").name == "A100 80GB"
    assert find_accelerator("h100 pcie").name == "H100 PCIe"
    assert find_accelerator("NVIDIA GeForce RTX 4090").name == "RTX 4090"


def test_link_conversions_match_the_playbook():
    assert pcie_bandwidth_gbs(4, 8) == pytest.approx(15.75, abs=0.01)  # lstopo: 15.75 GB/s
    assert pcie_bandwidth_gbs(5, 16) == pytest.approx(63.0, abs=0.1)
    assert pcie_bandwidth_gbs(6, 1) == pytest.approx(7.563, abs=0.001)
    assert gbps_to_gbs(100) == 12.5


@pytest.mark.parametrize(
    "name, ridge", [("H100 SXM", 295), ("H200", 206), ("A100 80GB", 153), ("B200", 281)]
)
def test_ridge_points(name, ridge):
    assert find_accelerator(name).ridge_point("bf16") == pytest.approx(ridge, abs=1)


@pytest.mark.parametrize(
    "mnk, ai",
    [
        ((16384, 8192, 1280), 1037),
        ((16384, 1024, 8192), 862),
        ((16384, 8192, 7168), 3100),
        ((16384, 3584, 8192), 2164),
        ((8192, 8192, 8192), 2731),
    ],
)
def test_gemm_intensity_of_the_playbook_shapes(mnk, ai):
    assert rl.gemm(*mnk).intensity == pytest.approx(ai, rel=0.002)


def test_roofline_bounds():
    h100 = find_accelerator("h100")
    big = rl.roofline(rl.gemm(8192, 8192, 8192), h100)
    assert big.bound == "compute-bound" and big.attainable_flops == h100.peak_flops("bf16")
    gemv = rl.roofline(rl.decode_gemv(2048, 8192, batch=1), h100)
    assert gemv.bound == "memory-bound" and gemv.attainable_flops < h100.peak_flops("bf16") / 100
    naive = rl.attention(1, 32, 4096, 64, fused=False)
    assert naive.intensity < rl.attention(1, 32, 4096, 64).intensity
