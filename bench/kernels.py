"""Matmul TFLOP/s per dtype and device-to-device copy bandwidth, against the hardware table.

python bench/kernels.py            # on a GPU; on CPU it times fp32/bf16 matmuls only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from crucible.plan.hardware import lookup_accelerator


def _time(fn, reps: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=None, help="square matmul size")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.size or (8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    acc = lookup_accelerator(name) if device.type == "cuda" else None
    rows = []
    print(f"# kernels on {name}, torch {torch.__version__}")
    print("| kernel | shape | measured | table peak |")
    print("|---|---|---|---|")
    dtypes = [("bf16", torch.bfloat16), ("fp32 (no tf32)", torch.float32)]
    torch.backends.cuda.matmul.allow_tf32 = False
    for label, dt in dtypes:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        sec = _time(lambda a=a, b=b: a @ b, 10, device)
        tflops = 2 * n**3 / sec / 1e12
        peak = f"{acc.bf16_dense_tflops} (dense bf16)" if acc and dt == torch.bfloat16 else "-"
        print(f"| matmul {label} | {n}x{n}x{n} | {tflops:,.1f} TFLOP/s | {peak} |")
        rows.append(dict(kernel=f"matmul {label}", n=n, tflops=tflops))
    if device.type == "cuda" and hasattr(torch, "float8_e4m3fn"):
        try:
            a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=device)
            sec = _time(
                lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                10,
                device,
            )
            tflops = 2 * n**3 / sec / 1e12
            print(f"| matmul fp8 e4m3 | {n}x{n}x{n} | {tflops:,.1f} TFLOP/s | - |")
            rows.append(dict(kernel="matmul fp8", n=n, tflops=tflops))
        except Exception as e:  # fp8 needs Hopper/Ada; report rather than fail
            print(f"| matmul fp8 e4m3 | - | unavailable: {type(e).__name__} | - |")
        src = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        sec = _time(lambda: dst.copy_(src), 10, device)
        gbs = 2 * src.numel() / sec / 1e9  # bytes read + bytes written
        print(f"| device-to-device copy | 1 GiB | {gbs:,.0f} GB/s (read+write) | - |")
        rows.append(dict(kernel="d2d copy", gb_s=gbs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
