"""`crucible doctor`: what this machine is, whether it performs as its table entry says, and
whether checkpoints survive a round trip on the target storage.

A check fails when a device measures below `threshold` (default 50%) of its table figure: bf16
matmul against the dense peak, pinned host->device copy against the PCIe link per direction,
device->device copy against the memory bandwidth, or when a checkpoint does not read back bit for
bit. A well-working H100 reaches ~75% of its dense bf16 peak (docs/benchmarks.md), so 50% catches
a throttled, misconfigured or wrongly identified card without flagging a normal one. A CPU has no
table entry: its figures are reported, never judged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from crucible.infra import kernels, storage, sysinfo
from crucible.infra.results import Table, to_markdown
from crucible.plan.hardware import Accelerator

THRESHOLD = 0.5
DEVICE_COLUMNS = ("index", "name", "memory_gib", "capability", "table_match")
CHECK_COLUMNS = ("name", "status", "measured", "unit", "reference", "detail")


@dataclass
class Check:
    name: str
    status: str  # ok | fail | info | skip
    measured: float | None = None
    unit: str = ""
    reference: float | None = None  # the table figure compared with
    detail: str = ""


def judge(
    name: str, measured: float, unit: str, reference: float | None, threshold: float = THRESHOLD
) -> Check:
    """ok/fail against `reference`; info (just the figure) when there is none."""
    if not reference:
        return Check(name, "info", measured, unit, None, "no table entry: reported, not judged")
    frac = measured / reference
    status = "ok" if frac >= threshold else "fail"
    detail = f"{frac:.0%} of table" + ("" if status == "ok" else f" (< {threshold:.0%})")
    return Check(name, status, measured, unit, reference, detail)


def device_checks(
    label: str,
    acc: Accelerator | None,
    matmul_bf16_tflops: float | None,
    h2d_gbs: float | None = None,
    d2d_gbs: float | None = None,
    threshold: float = THRESHOLD,
) -> list[Check]:
    """Judge one device's measured figures against its table entry (pure: figures are inputs)."""
    checks = []
    if matmul_bf16_tflops is not None:
        peak = acc.dense_tflops.get("bf16") if acc else None
        checks.append(judge(f"{label} matmul bf16", matmul_bf16_tflops, "TFLOP/s", peak, threshold))
    if h2d_gbs is not None:
        link = kernels.host_link_gbs(acc) if acc else None
        checks.append(judge(f"{label} host->device copy", h2d_gbs, "GB/s", link, threshold))
    if d2d_gbs is not None:
        hbm = acc.memory_bw_gbs if acc else None
        checks.append(judge(f"{label} device->device copy", d2d_gbs, "GB/s", hbm, threshold))
    return checks


def _measure_device(
    device: torch.device, acc: Accelerator | None, min_time_s: float, threshold: float
) -> list[Check]:
    cuda = device.type == "cuda"
    label = f"cuda:{device.index}" if cuda else "cpu"
    # The CPU has no bf16 peak to compare with and runs fp32 best: time that instead.
    mm = kernels.matmul_bench(
        device, ("bf16",) if cuda else ("fp32",), acc=acc, min_time_s=min_time_s
    )[0]
    copies, _ = kernels.copy_bench(device, acc=acc, min_time_s=min_time_s)
    by_name = {r.kernel: r.measured for r in copies}
    if not cuda:
        return [
            Check(
                "cpu matmul fp32",
                "info",
                mm.measured,
                "TFLOP/s",
                None,
                "no table entry for CPUs: reported, not judged",
            ),
            Check(
                "cpu host memcpy (read+write)",
                "info",
                by_name["host memcpy (read+write)"],
                "GB/s",
                None,
                "no CUDA device: host<->device copies skipped",
            ),
        ]
    if mm.note:  # bf16 unavailable on this card
        return [Check(f"{label} matmul bf16", "skip", detail=mm.note)]
    return device_checks(
        label,
        acc,
        mm.measured,
        by_name.get("host->device (pinned)"),
        by_name.get("device->device (read+write)"),
        threshold,
    )


def roundtrip_check(trip: storage.RoundTrip, where: Path) -> list[Check]:
    status = "ok" if trip.identical else "fail"
    shown = ", ".join(trip.mismatched[:3]) + ("..." if len(trip.mismatched) > 3 else "")
    detail = (
        f"{trip.tensors} tensors identical bit for bit"
        if trip.identical
        else f"{len(trip.mismatched)} of {trip.tensors} tensors differ: {shown}"
    )
    return [
        Check(f"checkpoint round trip ({where})", status, trip.bytes / 1e6, "MB", None, detail),
        Check("checkpoint write", "info", trip.write_mb_s, "MB/s", None, "save + fsync"),
        Check("checkpoint read", "info", trip.read_mb_s, "MB/s", None, "may be the page cache"),
    ]


@dataclass
class DoctorReport:
    versions: dict[str, Any]
    cpu: dict[str, Any]
    devices: list[dict[str, Any]]
    env: dict[str, str]
    checks: list[Check] = field(default_factory=list)
    threshold: float = THRESHOLD

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def run_doctor(
    storage_dir: str | Path | None = ".",
    gpu: str | None = None,
    measure: bool = True,
    min_time_s: float = 0.3,
    threshold: float = THRESHOLD,
) -> DoctorReport:
    """Collect the environment, then (measure) time each device, then the checkpoint trip."""
    forced = kernels.table_entry(gpu) if gpu else None  # fails early, listing the known names
    if storage_dir is not None:
        storage.check_dir(storage_dir, writable=True)  # one clear line before any timing
    report = DoctorReport(
        sysinfo.versions(),
        sysinfo.cpu_info(),
        sysinfo.devices(),
        sysinfo.env_vars(),
        threshold=threshold,
    )
    if measure:
        if torch.cuda.is_available():
            for d in report.devices:
                device = torch.device("cuda", d["index"])
                acc = forced or kernels.device_accelerator(device)
                if acc is None:
                    report.checks.append(
                        Check(
                            f"cuda:{d['index']} table",
                            "info",
                            detail=(
                                f"'{d['name']}' is not in the hardware table: figures not judged "
                                "(--gpu NAME compares with a listed card)"
                            ),
                        )
                    )
                report.checks += _measure_device(device, acc, min_time_s, threshold)
        else:
            report.checks += _measure_device(torch.device("cpu"), forced, min_time_s, threshold)
    if storage_dir is not None:
        trip = storage.checkpoint_roundtrip(storage_dir)
        report.checks += roundtrip_check(trip, Path(storage_dir))
    return report


def _kv_table(title: str, d: dict[str, Any], notes: list[str] | None = None) -> Table:
    rows = [{"name": k, "value": "-" if v is None else v} for k, v in d.items()]
    return Table(title, ["name", "value"], rows, notes or [])


def report_markdown(report: DoctorReport) -> str:
    cpu = {k: v for k, v in report.cpu.items() if k != "numa_nodes"}
    numa = report.cpu.get("numa_nodes") or []
    no_numa = [] if numa else ["/sys/devices/system/node not present"]
    no_gpu = [] if report.devices else ["no CUDA device visible"]
    no_env = [] if report.env else ["none of CUDA_*, NCCL_*, OMP_*, MKL_*, TORCH_* set"]
    verdict = "all checks passed" if report.ok else "SOME CHECKS FAILED"
    rule = (
        f"fail: below {report.threshold:.0%} of the table figure, or a checkpoint that does not "
        "read back bit for bit; info: reported only"
    )
    tables = [
        _kv_table("Versions", report.versions),
        _kv_table("CPU", cpu),
        Table("NUMA nodes", ["node", "cpus", "ncpus", "mem_gib"], numa, no_numa),
        Table("Devices", [*DEVICE_COLUMNS], report.devices, no_gpu),
        _kv_table("Environment variables", report.env, no_env),
        Table("Checks", [*CHECK_COLUMNS], [asdict(c) for c in report.checks], [verdict, rule]),
    ]
    return "\n".join(["# crucible doctor\n", *(to_markdown(t) for t in tables)])
