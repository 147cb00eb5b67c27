"""Training throughput: our step vs transformers.LlamaForCausalLM, same config, same batch, same run.

Each cell times forward + backward + AdamW step on random tokens after warm-up steps and reports
the median tokens/s of both implementations and their ratio (ours / transformers). Cells: fp32 and
bf16 autocast, eager and torch.compile.

    python bench/train_throughput.py                      # the tiny shape, all four cells
    python bench/train_throughput.py --shape 32m --steps 6
    python bench/train_throughput.py --device cuda --shape 1b --seq 4096 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from crucible.config import ModelConfig
from crucible.model import Transformer
from crucible.model.hf import to_hf_config
from crucible.train.setup import compile_model

SHAPES = {
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688,
                 vocab_size=8192),
    "32m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376,
                vocab_size=16384),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
               intermediate_size=8192, vocab_size=128256, rope_theta=50000.0),
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(model, step_loss, batch, device, dtype, steps: int, warmup: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with ctx():
            loss = step_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch.shape[0] * (batch.shape[1] - 1) / statistics.median(times)


def ours_loss(model, x):
    return model(x[:, :-1], x[:, 1:]).loss


def hf_loss(model, x):
    return model(input_ids=x[:, :-1], labels=x[:, :-1]).loss


def build_pair(cfg: ModelConfig, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: CPU init of 1B params takes long
        ours = Transformer(cfg)
    hf_cfg = to_hf_config(cfg)
    config = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        theirs = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(".cache/inductor"))
    device = torch.device(args.device)
    cfg = ModelConfig(max_seq_len=args.seq, **SHAPES[args.shape])
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"# train throughput, shape {args.shape}, seq {args.seq}, batch {args.batch}, {machine}")
    print(f"# torch {torch.__version__}; tokens/s are medians of {args.steps} steps")
    print("| dtype | mode | ours tok/s | transformers tok/s | ours / transformers |")
    print("|---|---|---|---|---|")
    rows = []
    for dt_name in args.dtypes.split(","):
        dtype = {"fp32": None, "bf16": torch.bfloat16}[dt_name]
        for mode in args.modes.split(","):
            ours, theirs = build_pair(cfg, device)
            if mode == "compiled":
                compile_model(ours)  # what `train.compile: true` does in one process
                theirs = torch.compile(theirs)
            batch = x
            t_ours = time_training(ours, ours_loss, batch, device, dtype, args.steps, args.warmup)
            t_hf = time_training(theirs, hf_loss, batch, device, dtype, args.steps, args.warmup)
            ratio = t_ours / t_hf
            rows.append(dict(dtype=dt_name, mode=mode, ours=t_ours, hf=t_hf, ratio=ratio))
            print(
                f"| {dt_name} | {mode} | {t_ours:,.0f} | {t_hf:,.0f} | {ratio:.2f}x |", flush=True
            )
            del ours, theirs
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "args": vars(args),
                       "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
