"""Collective benchmarks: nccl-tests bus-bandwidth conventions, buffer sizes, a 2-rank gloo run."""

import math

import pytest
import torch

from crucible.infra import collectives as co


@pytest.mark.parametrize(
    "op, n, factor",
    [
        # nccl-tests doc/PERFORMANCE.md, worked by hand.
        ("all_reduce", 2, 1.0),  # 2 * 1 / 2
        ("all_reduce", 4, 1.5),  # 2 * 3 / 4
        ("all_reduce", 8, 1.75),  # 2 * 7 / 8
        ("all_gather", 2, 0.5),
        ("all_gather", 8, 0.875),  # 7 / 8
        ("reduce_scatter", 4, 0.75),
        ("all_to_all", 8, 0.875),
        ("broadcast", 8, 1.0),
        ("all_reduce", 1, 0.0),  # one rank moves nothing
    ],
)
def test_bus_factor_matches_nccl_tests(op, n, factor):
    assert co.bus_factor(op, n) == pytest.approx(factor)


def test_bandwidths_from_size_and_time():
    # 1 GB all-reduce in 0.5 s on 8 ranks: algbw 2 GB/s, busbw 2 * 2 * 7/8 = 3.5 GB/s.
    assert co.bandwidths("all_reduce", 10**9, 0.5, 8) == pytest.approx((2.0, 3.5))
    assert co.bandwidths("broadcast", 10**9, 0.5, 8) == pytest.approx((2.0, 2.0))


def test_unknown_collective_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown collective 'allreduce'.*all_reduce"):
        co.bus_factor("allreduce", 2)


def test_buffer_sizes_follow_nccl_tests_size_convention():
    # S is the whole operation: all-gather's output and reduce-scatter's input are n x a chunk.
    n, size = 4, 1 << 20
    ag = co._Buffers("all_gather", size, n, 0, torch.float32, "cpu")
    assert (ag.inp.numel(), ag.out.numel(), ag.size_bytes) == (65536, 262144, size)
    rs = co._Buffers("reduce_scatter", size, n, 0, torch.float32, "cpu")
    assert (rs.inp.numel(), rs.out.numel()) == (262144, 65536)
    a2a = co._Buffers("all_to_all", size, n, 0, torch.float32, "cpu")
    assert a2a.inp.numel() == a2a.out.numel() == 262144
    # 1000 bytes of fp32 on 3 ranks: whole elements per rank, rounded down (83 x 3 x 4 B).
    assert co._Buffers("all_reduce", 1000, 3, 0, torch.float32, "cpu").size_bytes == 996


def test_wrong_elements_are_counted():
    # Rank 1 of 2 after an all-to-all receives chunk j = j * n + 1 from rank j.
    buf = co._Buffers("all_to_all", 64, 2, 1, torch.float32, "cpu")
    buf.out.copy_(torch.tensor([1.0] * 8 + [3.0] * 8))
    assert buf.count_wrong() == 0
    buf.out[3] = 0.0
    assert buf.count_wrong() == 1


def test_two_gloo_ranks_spawned_by_one_command():
    results = co.spawn_collectives(
        2, "gloo", ops=list(co.OPS), sizes=[64 << 10], dtype="fp32", iters=3, warmup=1
    )
    assert [r.op for r in results] == list(co.OPS)
    for r in results:
        assert (r.ranks, r.backend, r.size_bytes, r.wrong) == (2, "gloo", 64 << 10, 0)
        assert r.algbw_gbs == pytest.approx(r.size_bytes / (r.time_us * 1e-6) / 1e9)
        assert r.busbw_gbs == pytest.approx(r.algbw_gbs * co.bus_factor(r.op, 2))
        assert math.isfinite(r.busbw_gbs) and r.busbw_gbs > 0
    table = co.results_table(results)
    assert len(table.rows) == 5 and "2(n-1)/n" in table.notes[0]


def test_spawn_rejects_bad_requests():
    with pytest.raises(ValueError, match="--nproc must be >= 2"):
        co.spawn_collectives(1, "gloo", ops=["all_reduce"], sizes=[1024])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl needs CUDA"):
            co.pick_backend("nccl")
