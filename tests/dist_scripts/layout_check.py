"""Run under torchrun (gloo, CPU): for each layout given on the command line, build the model the
trainer builds and compare it with one process built from the same seed.

Prints one JSON line per layout (rank 0): whether the assembled initial weights equal the
single-process ones bit for bit, whether TP ranks drew different shards, the relative
difference of the loss and the largest relative gradient difference after one forward-backward.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from crucible.config import load_config
from crucible.model import Transformer
from crucible.train.distributed import DistInfo, clip_grad_norm, finish, init_distributed
from crucible.train.parallelize import build_model

FULL = StateDictOptions(full_state_dict=True)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check(overrides: list[str]) -> dict:
    cfg = load_config("tiny", ["model.vocab_size=512", "train.dtype=fp32", *overrides])
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = cfg.distributed.tp
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    info = DistInfo(rank, world, 0, tp, mesh)
    model = build_model(cfg, info, torch.device("cpu"), None)
    torch.manual_seed(cfg.seed)
    ref = Transformer(cfg.model)
    got = get_model_state_dict(model, options=FULL)
    want = ref.state_dict()
    init_equal = all(torch.equal(got[k], want[k]) for k in want)
    # The SmolLM3 bug: TP ranks drawing the same numbers for their different shards.
    shards_differ = True
    if tp > 1:
        q = model.layers[0].self_attn.q_proj.weight.to_local()
        parts = [torch.empty_like(q) for _ in range(world)]
        dist.all_gather(parts, q.contiguous())
        shards_differ = not torch.equal(parts[0], parts[1])
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.model.vocab_size, (4, 64), generator=gen)
    mine = x.chunk(info.dp_size)[info.dp_rank]  # each data-parallel rank: its share
    loss = model(mine, mine).loss
    loss.backward()
    clip_grad_norm(list(model.parameters()), 1e9)
    total = loss.detach().clone()
    dist.all_reduce(total)
    total = total / world  # every TP rank of a group holds the same loss
    ref_loss = ref(x, x).loss
    ref_loss.backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    worst = 0.0
    for n, g in grads.items():
        key = n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        r = ref_grads[key]
        worst = max(worst, float((g - r).abs().max() / r.abs().max().clamp_min(1e-12)))
    return {
        "layout": overrides,
        "init_equal": init_equal,
        "shards_differ": shards_differ,
        "loss_rel": abs(float(total) - float(ref_loss)) / float(ref_loss),
        "grad_rel": worst,
    }


def main() -> None:
    cfg = load_config("tiny", ["distributed.strategy=fsdp", "train.micro_batch_size=1"])
    init_distributed(cfg, "cpu")
    torch.set_num_threads(1)
    for layout in sys.argv[1:]:
        out = check(layout.split(",") if layout else [])
        if dist.get_rank() == 0:
            print(json.dumps(out), flush=True)
    finish(0)


if __name__ == "__main__":
    main()
