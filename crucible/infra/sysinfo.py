"""What the machine is: CPU, NUMA nodes, library versions, relevant environment variables."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

# Variables that change how collectives, kernels and threads behave.
ENV_PATTERN = re.compile(r"^(CUDA_|NCCL_|OMP_|MKL_|TORCH_|PYTORCH_|GLOO_|TORCHINDUCTOR_)")
ENV_EXTRA = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpulist_count(text: str) -> int:
    """Number of CPUs in a kernel cpulist such as '0-15,32-47'."""
    n = 0
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def numa_nodes(root: Path = Path("/sys/devices/system/node")) -> list[dict[str, Any]]:
    """One entry per NUMA node (cpus, memory GiB) when the kernel exposes them; else []."""
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus = (d / "cpulist").read_text().strip() if (d / "cpulist").is_file() else ""
        mem_gib = None
        meminfo = d / "meminfo"
        if meminfo.is_file():
            m = re.search(r"MemTotal:\s+(\d+)\s+kB", meminfo.read_text())
            mem_gib = round(int(m.group(1)) / 2**20, 1) if m else None
        nodes.append(
            {
                "node": int(d.name[4:]),
                "cpus": cpus,
                "ncpus": _cpulist_count(cpus),
                "mem_gib": mem_gib,
            }
        )
    return nodes


def cpu_info() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,  # what this process may run on (containers, taskset)
        "torch_threads": torch.get_num_threads(),
        "numa_nodes": numa_nodes(),
    }


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError):
            nccl = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "numpy": _version("numpy"),
        "cuda_build": torch.version.cuda,  # None in a CPU build
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "nccl": nccl,
        "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
    }


def env_vars(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: env[k] for k in sorted(env) if ENV_PATTERN.match(k) or k in ENV_EXTRA}


def devices() -> list[dict[str, Any]]:
    """CUDA devices with their hardware-table match (None when the table lacks the card)."""
    from crucible.plan.hardware import lookup_accelerator

    out = []
    if not torch.cuda.is_available():
        return out
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        acc = lookup_accelerator(p.name)
        out.append(
            {
                "index": i,
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "table_match": acc.name if acc else None,
            }
        )
    return out
