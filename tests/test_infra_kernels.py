"""Matmul and copy measurements against the hardware table; the timer and size parser."""

import pytest
import torch

from crucible.infra import kernels
from crucible.infra.timing import measure, parse_size
from crucible.plan.hardware import UnknownAcceleratorError, find_accelerator


def test_host_link_is_the_pcie_figure_per_direction():
    # Gen5: 32 GT/s x 128/130 / 8 bits x 16 lanes = 63.015 GB/s; Gen4 half of it.
    h100 = find_accelerator("h100")
    assert kernels.host_link_gbs(h100) == pytest.approx(32 * 128 / 130 / 8 * 16)
    assert kernels.host_link_gbs(find_accelerator("a100")) == pytest.approx(31.5077, rel=1e-4)


def test_matmul_on_cpu_reports_without_a_table_peak():
    rows = kernels.matmul_bench(torch.device("cpu"), ("fp32", "bf16"), n=64, min_time_s=0.01)
    assert [r.kernel for r in rows] == ["matmul fp32", "matmul bf16"]
    assert all(r.measured > 0 and r.peak is None and r.fraction is None for r in rows)


def test_matmul_compared_with_a_named_card_uses_the_dense_peak():
    acc = kernels.device_accelerator(torch.device("cpu"), "H100 SXM")
    (row,) = kernels.matmul_bench(torch.device("cpu"), ("bf16",), n=32, acc=acc, min_time_s=0.01)
    assert row.peak == 989.4  # dense, not the 2:4 sparse 1978.8
    assert row.fraction == pytest.approx(row.measured / 989.4)
    table = kernels.kernels_table("Matmul", [row], [])
    assert table.rows[0]["table peak"] == 989.4


def test_unknown_dtype_and_unknown_gpu_are_clear_errors():
    with pytest.raises(ValueError, match="unknown dtype 'fp7'"):
        kernels.matmul_bench(torch.device("cpu"), ("fp7",), n=16, min_time_s=0.01)
    with pytest.raises(UnknownAcceleratorError, match="unknown GPU 'h900'; known: H100 SXM"):
        kernels.device_accelerator(torch.device("cpu"), "h900")


def test_copy_without_cuda_measures_host_memcpy_and_says_why():
    rows, notes = kernels.copy_bench(torch.device("cpu"), 1 << 20, min_time_s=0.01)
    assert [r.kernel for r in rows] == ["host memcpy (read+write)"]
    assert rows[0].measured > 0 and rows[0].unit == "GB/s"
    assert any("no CUDA device" in n for n in notes)


def test_measure_stops_on_time_or_count():
    calls = []
    t = measure(lambda: calls.append(1), warmup=2, min_time_s=10.0, min_reps=3, max_reps=7)
    assert t.reps == 7 and len(calls) == 9  # 2 warm-up + 7 timed
    assert t.min_s <= t.median_s


@pytest.mark.parametrize(
    "text, n",
    [("4096", 4096), ("64K", 65536), ("16M", 16 << 20), ("1GiB", 1 << 30), ("1.5G", 3 << 29)],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        parse_size("lots")
