"""Matmul TFLOP/s per dtype and copy bandwidths, each set against the hardware table.

Peaks are the table's *dense* figures (`crucible.plan.hardware`); host-device copies are compared
with the PCIe link per direction (`pcie_bandwidth_gbs`), device-to-device copies with the memory
bandwidth (bytes read + bytes written, since a copy does both). CPUs have no table entry: their
figures are reported as measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from crucible.infra.results import Table
from crucible.infra.timing import measure
from crucible.plan.hardware import Accelerator, lookup_accelerator, pcie_bandwidth_gbs

_TORCH_DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "tf32": torch.float32,  # fp32 storage, TF32 tensor-core math when allowed
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
GPU_DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
CPU_DTYPES = ("fp32", "bf16")


@dataclass
class KernelResult:
    kernel: str
    shape: str
    measured: float
    unit: str
    peak: float | None = None  # the table figure it is compared with (same unit)
    note: str = ""

    @property
    def fraction(self) -> float | None:
        return self.measured / self.peak if self.peak else None


def device_accelerator(device: torch.device, gpu: str | None = None) -> Accelerator | None:
    """The table entry to compare with: `gpu` if given (raises listing known names), else the
    CUDA device's name looked up; None on CPU or for an unknown card."""
    if gpu:
        return table_entry(gpu)
    if device.type != "cuda":
        return None
    return lookup_accelerator(torch.cuda.get_device_name(device))


def table_entry(name: str) -> Accelerator:
    """The entry a user names with --gpu; an unknown name fails listing the known ones."""
    from crucible.plan.hardware import ACCELERATORS, UnknownAcceleratorError, find_accelerator

    try:
        return find_accelerator(name)
    except UnknownAcceleratorError:
        known = ", ".join(a.name for a in ACCELERATORS)
        raise UnknownAcceleratorError(f"unknown GPU '{name}'; known: {known}") from None


def host_link_gbs(acc: Accelerator) -> float | None:
    """Per-direction GB/s of the entry's host link ('PCIe Gen5 x16' -> 63.0); None if unparsed."""
    m = re.search(r"Gen\s*(\d+)\s*x\s*(\d+)", acc.host_link)
    return pcie_bandwidth_gbs(int(m.group(1)), int(m.group(2))) if m else None


def _sync_for(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _fp8_matmul(n: int, device: torch.device):
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # _scaled_mm wants col-major
    one = torch.ones((), device=device)
    return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def matmul_bench(
    device: torch.device,
    dtypes: tuple[str, ...] | None = None,
    n: int | None = None,
    acc: Accelerator | None = None,
    min_time_s: float = 0.5,
) -> list[KernelResult]:
    """Square n x n x n matmuls: 2n^3 FLOP per call, against the table's dense peak per dtype."""
    cuda = device.type == "cuda"
    dtypes = dtypes or (GPU_DTYPES if cuda else CPU_DTYPES)
    n = n or (8192 if cuda else 1024)
    out = []
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for dt in dtypes:
            peak = acc.dense_tflops.get(dt) if acc else None
            try:
                if dt == "fp8":
                    fn = _fp8_matmul(n, device)
                else:
                    if dt not in _TORCH_DTYPES:
                        raise ValueError(
                            f"unknown dtype '{dt}' (known: {', '.join(_TORCH_DTYPES)})"
                        )
                    torch.backends.cuda.matmul.allow_tf32 = dt == "tf32"
                    a = torch.randn(n, n, device=device, dtype=_TORCH_DTYPES[dt])
                    b = torch.randn(n, n, device=device, dtype=_TORCH_DTYPES[dt])
                    fn = lambda a=a, b=b: a @ b  # noqa: E731
                t = measure(fn, _sync_for(device), min_time_s=min_time_s)
            except (RuntimeError, TypeError, AttributeError) as e:  # e.g. fp8 before Hopper/Ada
                out.append(
                    KernelResult(
                        f"matmul {dt}",
                        f"{n}^3",
                        0.0,
                        "TFLOP/s",
                        peak,
                        f"unavailable: {type(e).__name__}",
                    )
                )
                continue
            tflops = 2 * n**3 / t.median_s / 1e12
            out.append(KernelResult(f"matmul {dt}", f"{n}^3", tflops, "TFLOP/s", peak))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return out


def copy_bench(
    device: torch.device,
    nbytes: int | None = None,
    acc: Accelerator | None = None,
    min_time_s: float = 0.3,
) -> tuple[list[KernelResult], list[str]]:
    """Host memcpy always; pinned host<->device and device<->device copies with CUDA."""
    cuda = device.type == "cuda"
    nbytes = nbytes or (1 << 30 if cuda else 1 << 27)
    label = f"{nbytes / 2**20:.0f} MiB"
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    src.fill_(1)  # touch the pages so the first copy does not pay for faulting them in
    dst.fill_(0)
    t = measure(lambda: dst.copy_(src), min_time_s=min_time_s)
    rows = [KernelResult("host memcpy (read+write)", label, 2 * nbytes / t.median_s / 1e9, "GB/s")]
    notes = []
    if not cuda:
        notes.append("no CUDA device: host<->device and device<->device copies skipped")
        return rows, notes
    sync = _sync_for(device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev2 = torch.empty_like(dev)
    link = host_link_gbs(acc) if acc else None
    for name, fn in (
        ("host->device (pinned)", lambda: dev.copy_(pinned, non_blocking=True)),
        ("device->host (pinned)", lambda: pinned.copy_(dev, non_blocking=True)),
    ):
        t = measure(fn, sync, min_time_s=min_time_s)
        rows.append(KernelResult(name, label, nbytes / t.median_s / 1e9, "GB/s", link))
    t = measure(lambda: dev2.copy_(dev), sync, min_time_s=min_time_s)
    hbm = acc.memory_bw_gbs if acc else None
    rows.append(
        KernelResult(
            "device->device (read+write)", label, 2 * nbytes / t.median_s / 1e9, "GB/s", hbm
        )
    )
    if link:
        notes.append(f"host link peak: {acc.host_link}, {link:.1f} GB/s per direction")
    return rows, notes


def kernels_table(title: str, rows: list[KernelResult], notes: list[str]) -> Table:
    out = []
    for r in rows:
        frac = r.fraction
        out.append(
            {
                "kernel": r.kernel,
                "shape": r.shape,
                "measured": r.measured,
                "unit": r.unit,
                "table peak": r.peak,
                "% of peak": f"{100 * frac:.0f}%" if frac is not None else "-",
                "note": r.note,
            }
        )
    return Table(
        title,
        ["kernel", "shape", "measured", "unit", "table peak", "% of peak", "note"],
        out,
        notes,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from crucible.infra.sysinfo import cpu_model

    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"
