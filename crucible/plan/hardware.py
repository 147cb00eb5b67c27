"""Accelerator figures: the single source of peak numbers used for MFU, planning and benchmarks.

Every peak is a *dense* tensor-core (or matrix-core) rate from the vendor's datasheet, in TFLOP/s.
Structured-sparsity (2:4) figures are kept in a separate field and never used for MFU or planning:
a dense training step cannot reach them. Memory is the nominal capacity as sold, read as GiB: an
"80GB" H100 exposes 79.6 GiB to CUDA, so the vendors' GB are binary in practice; bandwidths are GB/s (10^9 bytes); NVLink-style figures are the bidirectional per-GPU total
as vendors quote them (half of it flows each way).

Consumer GeForce cards: the bf16/fp16 figure is the rate *with fp32 accumulation* (what PyTorch
uses), which NVIDIA halves on GeForce parts relative to fp16 accumulation.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "fp4", "int8")


class UnknownAcceleratorError(ValueError):
    """A name that matches no table entry; the message lists the known names."""


@dataclass(frozen=True)
class Accelerator:
    name: str
    dense_tflops: dict[str, float]  # dtype -> dense TFLOP/s (TOP/s for int8)
    memory_gib: float
    memory_bw_gbs: float  # HBM/GDDR bandwidth, GB/s
    interconnect: str  # scale-up link as sold
    interconnect_gbs: float  # bidirectional GB/s per GPU on that link (0: none)
    host_link: str  # PCIe generation and width
    tdp_w: int
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that identify it
    aliases: tuple[str, ...] = ()  # short names a user may type (lower case, no spaces)
    sparse_tflops: dict[str, float] = field(default_factory=dict)  # 2:4; never used for MFU
    source: str = "vendor datasheet"

    @property
    def bf16_dense_tflops(self) -> float:
        """The MFU denominator used by the trainer's progress display."""
        return self.dense_tflops["bf16"]

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak in FLOP/s for `dtype`; a clear error when the card has no such rate."""
        if dtype not in self.dense_tflops:
            have = ", ".join(self.dense_tflops)
            raise ValueError(f"{self.name} has no {dtype} tensor rate in the table (has: {have})")
        return self.dense_tflops[dtype] * 1e12

    def ridge_point(self, dtype: str = "bf16") -> float:
        """FLOP per byte of HBM traffic above which a kernel is compute-bound."""
        return self.peak_flops(dtype) / (self.memory_bw_gbs * 1e9)


def _twice(d: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    # NVIDIA's 2:4 sparse figures are exactly twice the dense ones for these dtypes.
    return {k: 2 * d[k] for k in keys if k in d}


_HOPPER = {
    "fp64": 66.9,  # FP64 tensor core (vector FP64 is half)
    "fp32": 66.9,
    "tf32": 494.7,
    "bf16": 989.4,
    "fp16": 989.4,
    "fp8": 1978.9,
    "int8": 1978.9,
}
_H100_PCIE = {"fp64": 51.2, "fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}
_H100_PCIE |= {"fp8": 1513.0, "int8": 1513.0}
_H100_NVL = {"fp64": 60.0, "fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp16": 835.0}
_H100_NVL |= {"fp8": 1670.5, "int8": 1670.5}
_BLACKWELL = {"fp64": 40.0, "fp32": 80.0, "tf32": 1125.0, "bf16": 2250.0, "fp16": 2250.0}
_BLACKWELL |= {"fp8": 4500.0, "fp4": 9000.0, "int8": 4500.0}
_AMPERE = {"fp64": 19.5, "fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0, "int8": 624.0}
_L40S = {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0, "int8": 733.0}
_MI300X = {"fp64": 163.4, "fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4}
_MI300X |= {"fp8": 2614.9, "int8": 2614.9}
_RTX4090 = {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2, "fp8": 330.3, "int8": 660.6}
_RTX3090 = {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0, "int8": 284.0}
_SPARSE = ("tf32", "bf16", "fp16", "fp8", "fp4", "int8")

ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator(
        "H100 SXM", _HOPPER, 80, 3350, "NVLink 4", 900, "PCIe Gen5 x16", 700,
        ("H100 80GB HBM3", "H100 SXM"), ("h100", "h100sxm", "h100-sxm"),
        _twice(_HOPPER, _SPARSE),
    ),
    Accelerator(
        "H100 PCIe", _H100_PCIE, 80, 2000, "NVLink bridge", 600, "PCIe Gen5 x16", 350,
        ("H100 PCIe",), ("h100pcie", "h100-pcie"), _twice(_H100_PCIE, _SPARSE),
    ),
    Accelerator(
        "H100 NVL", _H100_NVL, 94, 3900, "NVLink bridge", 600, "PCIe Gen5 x16", 400,
        ("H100 NVL",), ("h100nvl", "h100-nvl"), _twice(_H100_NVL, _SPARSE),
    ),
    Accelerator(
        "H200", _HOPPER, 141, 4800, "NVLink 4", 900, "PCIe Gen5 x16", 700,
        ("H200",), ("h200", "h200sxm", "h200-sxm"), _twice(_HOPPER, _SPARSE),
    ),
    Accelerator(
        "B200", _BLACKWELL, 180, 8000, "NVLink 5", 1800, "PCIe Gen6 x16", 1000,
        ("B200",), ("b200",), _twice(_BLACKWELL, _SPARSE),
    ),
    Accelerator(
        "A100 80GB", _AMPERE, 80, 2039, "NVLink 3", 600, "PCIe Gen4 x16", 400,
        ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB"), ("a100-80gb", "a100-80", "a100_80gb"),
        _twice(_AMPERE, _SPARSE),
    ),
    Accelerator(
        "A100 40GB", _AMPERE, 40, 1555, "NVLink 3", 600, "PCIe Gen4 x16", 400,
        ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100"), ("a100", "a100-40gb", "a100-40"),
        _twice(_AMPERE, _SPARSE),
    ),
    Accelerator(
        "L40S", _L40S, 48, 864, "none (PCIe only)", 0, "PCIe Gen4 x16", 350,
        ("L40S",), ("l40s",), _twice(_L40S, _SPARSE),
    ),
    Accelerator(
        "MI300X", _MI300X, 192, 5300, "Infinity Fabric", 896, "PCIe Gen5 x16", 750,
        ("MI300X",), ("mi300x", "mi300"), _twice(_MI300X, ("tf32", "bf16", "fp16", "fp8", "int8")),
    ),
    Accelerator(
        "RTX 4090", _RTX4090, 24, 1008, "none (PCIe only)", 0, "PCIe Gen4 x16", 450,
        ("RTX 4090",), ("rtx4090", "4090"), _twice(_RTX4090, _SPARSE),
    ),
    Accelerator(
        "RTX 3090", _RTX3090, 24, 936, "NVLink bridge", 112.5, "PCIe Gen4 x16", 350,
        ("RTX 3090",), ("rtx3090", "3090"), _twice(_RTX3090, _SPARSE),
    ),
)  # fmt: skip


def lookup_accelerator(device_name: str) -> Accelerator | None:
    """The table entry whose identifying substring appears in a device name (None if unknown).

    Used with `torch.cuda.get_device_name()`; the trainer's MFU display reads
    `.bf16_dense_tflops` from the result.
    """
    for acc in ACCELERATORS:
        if any(m in device_name for m in acc.match):
            return acc
    return find_accelerator(device_name, strict=False)


def _key(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "-")


def find_accelerator(name: str, strict: bool = True) -> Accelerator | None:
    """The entry a user means by `name` ("h100", "H100 SXM", "a100-80gb", a CUDA device name).

    strict: raise UnknownAcceleratorError listing the known names instead of returning None.
    """
    key = _key(name)
    for acc in ACCELERATORS:
        names = {_key(acc.name), *(_key(a) for a in acc.aliases)}
        if key in names or key.replace("-", "") in {n.replace("-", "") for n in names}:
            return acc
    for acc in ACCELERATORS:
        if any(m.lower() in name.lower() for m in acc.match):
            return acc
    if not strict:
        return None
    known = [a.name for a in ACCELERATORS]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UnknownAcceleratorError(
        f"unknown accelerator '{name}'.{hint} Known: {', '.join(known)} "
        "(or give its dense peak with --peak-tflops)"
    )


def custom_accelerator(name: str, bf16_dense_tflops: float, memory_gib: float) -> Accelerator:
    """An entry for hardware the table lacks, from the two figures planning needs."""
    return Accelerator(
        name, {"bf16": bf16_dense_tflops}, memory_gib, 0.0, "unknown", 0, "unknown", 0, (name,),
        source="user supplied",
    )  # fmt: skip


# ------------------------------------------------------------------ links and units

# Per-lane transfer rate (GT/s) and line-code efficiency per PCIe generation. Gen 1-2 use 8b/10b,
# Gen 3-5 128b/130b, Gen 6+ PAM4 with FLIT framing (242 useful bytes per 256).
_PCIE: dict[int, tuple[float, float]] = {
    1: (2.5, 8 / 10),
    2: (5.0, 8 / 10),
    3: (8.0, 128 / 130),
    4: (16.0, 128 / 130),
    5: (32.0, 128 / 130),
    6: (64.0, 242 / 256),
    7: (128.0, 242 / 256),
}


def pcie_bandwidth_gbs(gen: int, lanes: int = 16) -> float:
    """Usable PCIe bandwidth per direction in GB/s (Gen4 x8 is the p5 host hop, ~15.75 GB/s)."""
    if gen not in _PCIE:
        raise ValueError(f"PCIe generation {gen} unknown (known: {sorted(_PCIE)})")
    rate, efficiency = _PCIE[gen]
    return rate * efficiency / 8 * lanes


def gbps_to_gbs(gbit_per_s: float) -> float:
    """Network line rates are in bits: 400 Gb/s InfiniBand NDR moves 50 GB/s."""
    return gbit_per_s / 8
