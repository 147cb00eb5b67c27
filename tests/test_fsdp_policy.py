"""FSDP2 policy, prefetch and DDP wrapping order, in one process on a 1-rank gloo group; the
background batch prefetcher. (Sharded initialisation and multi-rank numerics: tests/test_tp.py.)"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from crucible.config import load_config
from crucible.data.loader import PretrainLoader
from crucible.data.shards import ShardSet
from crucible.model import Transformer
from crucible.train.distributed import DistInfo
from crucible.train.parallelize import apply_fsdp, build_model, fsdp_mp_policy


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    finally:
        dist.destroy_process_group()


def _cfg(*overrides):
    return load_config("tiny", ["model.vocab_size=512", "model.num_layers=3", *overrides])


@pytest.mark.parametrize(
    "overrides, amp, param, reduce",
    [
        ([], torch.bfloat16, torch.bfloat16, torch.float32),  # auto follows bf16 autocast
        ([], None, None, None),  # fp32 training: no casts at all
        (["distributed.fsdp_param_dtype=fp32"], torch.bfloat16, None, None),
        (["distributed.fsdp_reduce_dtype=bf16"], torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (["distributed.fsdp_param_dtype=bf16"], None, torch.bfloat16, torch.float32),
    ],
)
def test_mixed_precision_policy(overrides, amp, param, reduce):
    policy = fsdp_mp_policy(_cfg(*overrides), amp)
    assert (policy.param_dtype, policy.reduce_dtype) == (param, reduce)


def test_fsdp_gathers_bf16_keeps_fp32_shards_and_prefetches(group):
    cfg = _cfg("distributed.strategy=fsdp", "distributed.fsdp_prefetch=2")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    apply_fsdp(model, group["dp"], cfg, torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights()
    seen = []
    model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: seen.append(m.weight.dtype)
    )
    x = torch.randint(0, 512, (1, 16))
    model(x, x).loss.backward()
    assert seen == [torch.bfloat16]  # gathered in bf16 for compute
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # sharded master stays fp32
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    states = [b._get_fsdp_state() for b in model.layers]
    fwd = [len(s._states_to_forward_prefetch) for s in states]
    bwd = [len(s._states_to_backward_prefetch) for s in states]
    assert fwd == [2, 1, 0] and bwd == [0, 1, 2]


def test_ddp_is_compiled_after_wrapping(group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = _cfg("train.compile=true", "train.micro_batch_size=1")
    info = DistInfo(rank=0, world_size=2, tp=1, mesh=group)  # 2 data-parallel ranks' code path
    model = build_model(cfg, info, torch.device("cpu"), None)
    assert isinstance(model, DDP)
    assert model._compiled_call_impl is not None  # the wrapper is compiled: buckets overlap
    assert model.module._compiled_call_impl is None  # ... not the model inside it
    torch.manual_seed(cfg.seed)
    ref = Transformer(cfg.model)
    for (name, p), q in zip(model.module.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), name  # meta init + init_weights == one process


def test_prefetched_batches_are_the_loaders_and_never_move_its_position(small_data):
    def loader():
        return PretrainLoader(ShardSet(small_data / "train"), seq_len=64, global_batch_size=8,
                              micro_batch_size=4, seed=3)  # fmt: skip

    plain, ahead = loader(), loader()
    ahead.enable_prefetch()
    try:
        for _ in range(3):
            a, b = plain.next_step(), ahead.next_step()
            assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
            assert ahead.state_dict() == plain.state_dict()  # a prefetched step is not consumed
        ahead.step = plain.step = 1  # a rollback: the prefetched step 3 is discarded
        a, b = plain.next_step(), ahead.next_step()
        assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
        assert ahead.step == 2
    finally:
        ahead.close()
