"""Accelerator figures: the single source of peak numbers used for MFU and planning.

Peaks are dense (no 2:4 sparsity) tensor-core FLOP/s from the vendors' datasheets. Sparse figures
are twice these and are never used for MFU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_dense_tflops: float
    memory_gib: float
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that identify it


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("H100 SXM", 989.4, 80, ("H100 80GB HBM3", "H100 SXM")),
    Accelerator("H100 PCIe", 756.0, 80, ("H100 PCIe",)),
    Accelerator("H100 NVL", 835.0, 94, ("H100 NVL",)),
    Accelerator("H200", 989.4, 141, ("H200",)),
    Accelerator("B200", 2250.0, 180, ("B200",)),
    Accelerator("A100 80GB", 312.0, 80, ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB")),
    Accelerator("A100 40GB", 312.0, 40, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100")),
    Accelerator("L40S", 362.05, 48, ("L40S",)),
    Accelerator("RTX 4090", 165.2, 24, ("RTX 4090",)),
    Accelerator("RTX 3090", 71.0, 24, ("RTX 3090",)),
)


def lookup_accelerator(device_name: str) -> Accelerator | None:
    """The table entry whose identifying substring appears in a CUDA device name."""
    for acc in ACCELERATORS:
        if any(m in device_name for m in acc.match):
            return acc
    return None
