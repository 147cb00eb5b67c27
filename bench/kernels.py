"""Matmul TFLOP/s per dtype and copy bandwidths, against the hardware table.

A thin wrapper over `crucible.infra.kernels` (the same code as `crucible bench matmul` and
`crucible bench copy`), kept so existing instructions keep working:

python bench/kernels.py            # on a GPU; on CPU it times fp32/bf16 matmuls and host memcpy
"""

from __future__ import annotations

import argparse

import torch

from crucible.infra import kernels
from crucible.infra.results import tables_json, to_markdown, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=None, help="square matmul size")
    ap.add_argument("--gpu", default=None, help="compare with this table entry")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acc = kernels.device_accelerator(device, args.gpu)
    name = kernels.device_name(device)
    mm = kernels.matmul_bench(device, n=args.size, acc=acc)
    copies, notes = kernels.copy_bench(device, acc=acc)
    tables = [
        kernels.kernels_table("Matmul", mm, [f"{name}, torch {torch.__version__}"]),
        kernels.kernels_table("Copy bandwidth", copies, notes),
    ]
    print("\n".join(to_markdown(t) for t in tables), end="")
    if args.json:
        write_json(args.json, {"device": name, "tables": tables_json(tables)})


if __name__ == "__main__":
    main()
