"""Engine throughput and MFU of our training step for a preset's shape, plus peak memory.

Times forward + backward + AdamW (fused on CUDA) at the preset's sequence length with bf16
autocast, with and without torch.compile, intra-document masking, activation checkpointing
(--ac) and FSDP2 on a one-rank group with a parameter dtype policy (--fsdp), as the trainer
builds them (crucible.train.parallelize), and reports tokens/s per
device, MFU against the card's dense bf16 peak (crucible.plan.hardware; FLOPs = 6 x matmul params
+ causal attention, crucible.plan.flops) and the peak allocated memory after steps 1 and 2.

    python bench/engine_mfu.py --preset llama3.2-1b-ablation --micro 3          # on a GPU
    python bench/engine_mfu.py --preset tiny --cells eager --steps 3             # CPU smoke run
    python bench/engine_mfu.py --cells compiled --doc off --ac none,selective,full --fsdp off,bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from crucible.config import load_config
from crucible.model import Transformer
from crucible.plan.flops import train_flops_per_token
from crucible.plan.hardware import lookup_accelerator
from crucible.train.activation_checkpointing import apply_activation_checkpointing
from crucible.train.parallelize import apply_fsdp, single_process_init
from crucible.train.setup import compile_model


def synthetic_doc_ids(batch: int, seq: int, mean_doc: int, gen: torch.Generator) -> torch.Tensor:
    """Document ids per token for packed documents of random (geometric-ish) lengths."""
    ids = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        pos, doc = 0, 0
        while pos < seq:
            length = int(torch.empty(1).exponential_(1 / mean_doc, generator=gen).item()) + 1
            ids[b, pos : pos + length] = doc
            pos, doc = pos + length, doc + 1
    return ids


def _one_rank_mesh(device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (1,), mesh_dim_names=("dp",))


def run_cell(cfg, micro, steps, warmup, compile_, doc, device, ac="none", fsdp="off"):
    model_cfg = cfg.model.model_copy(update={"doc_masking": doc})
    torch.manual_seed(0)
    if fsdp == "off":
        with torch.device(device):
            model = Transformer(model_cfg)
        apply_activation_checkpointing(model, ac)
        if compile_:
            compile_model(model)
    else:  # as the trainer: meta, checkpointing, per-block compile, fully_shard, init
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.distributed.fsdp_param_dtype = fsdp
        with torch.device("meta"):
            model = Transformer(model_cfg)
        apply_activation_checkpointing(model, ac)
        if compile_:
            compile_model(model, per_block=True)
        apply_fsdp(model, _one_rank_mesh(device)["dp"], run_cfg, torch.bfloat16)
        model.to_empty(device=device)
        with torch.no_grad(), single_process_init():
            model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    seq = cfg.train.seq_len
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model_cfg.vocab_size, (micro, seq + 1), generator=gen).to(device)
    doc_ids = synthetic_doc_ids(micro, seq, 1024, gen).to(device) if doc else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, mem = [], []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:], doc_ids=doc_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            if i < 2:
                mem.append(torch.cuda.max_memory_allocated() / 2**20)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tok_s = micro * seq / statistics.median(times)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return tok_s, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="llama3.2-1b-ablation")
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument("--micro", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cells", default="eager,compiled", help="eager and/or compiled")
    ap.add_argument("--doc", default="off,on", help="intra-document masking off and/or on")
    ap.add_argument("--ac", default="none", help="activation checkpointing: none,selective,full")
    ap.add_argument("--fsdp", default="off", help="off (no FSDP2) and/or FSDP2 gathers: bf16,fp32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = load_config(args.preset, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    acc = lookup_accelerator(name) if device.type == "cuda" else None
    fpt = train_flops_per_token(cfg.model, cfg.train.seq_len)
    print(f"# {args.preset}, seq {cfg.train.seq_len}, micro-batch {args.micro}, {name}, "
          f"torch {torch.__version__}, peak {acc.bf16_dense_tflops if acc else 'n/a'} TFLOP/s")  # fmt: skip
    print("| mode | doc mask | AC | FSDP2 gathers | tokens/s/device | MFU | peak MiB step 1 | "
          "step 2 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    cells = [(m, d, a, f) for m in args.cells.split(",") for d in args.doc.split(",")
             for a in args.ac.split(",") for f in args.fsdp.split(",")]  # fmt: skip
    for mode, doc, ac, fsdp in cells:
        tok_s, mem = run_cell(cfg, args.micro, args.steps, args.warmup, mode == "compiled",
                              doc == "on", device, ac, fsdp)  # fmt: skip
        mfu = fpt * tok_s / (acc.bf16_dense_tflops * 1e12) if acc else None
        m1, m2 = (f"{m:,.0f}" for m in mem) if len(mem) == 2 else ("-", "-")
        mfu_s = f"{mfu:.1%}" if mfu is not None else "-"
        print(f"| {mode} | {doc} | {ac} | {fsdp} | {tok_s:,.0f} | {mfu_s} | {m1} | {m2} |",
              flush=True)  # fmt: skip
        rows.append(dict(mode=mode, doc=doc, ac=ac, fsdp=fsdp, tokens_per_s=tok_s, mfu=mfu,
                         peak_mib=mem))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "preset": args.preset, "micro": args.micro, "rows": rows,
                       "flops_per_token": fpt, "torch": torch.__version__}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
