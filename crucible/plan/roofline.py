"""Roofline: arithmetic intensity of transformer operations and the FLOP/s a card can reach on them.

attainable = min(peak, intensity x memory bandwidth). Bytes are the minimum HBM traffic (each
input read once, each output written once), so intensities are upper bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from crucible.plan.hardware import Accelerator

BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "fp4": 0.5}


@dataclass(frozen=True)
class OpCost:
    name: str
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


@dataclass(frozen=True)
class Roofline:
    op: OpCost
    accelerator: str
    dtype: str
    peak_flops: float
    bandwidth: float  # bytes/s
    ridge: float  # FLOP/byte
    attainable_flops: float
    seconds: float  # lower bound: the op can't run faster than its roof

    @property
    def bound(self) -> str:
        return "compute-bound" if self.op.intensity >= self.ridge else "memory-bound"


def gemm(m: int, n: int, k: int, dtype: str = "bf16", out_dtype: str | None = None) -> OpCost:
    """(m x k) @ (k x n): 2mnk FLOPs; reads both inputs, writes the output."""
    b_in, b_out = BYTES[dtype], BYTES[out_dtype or dtype]
    return OpCost(
        f"gemm {m}x{n}x{k} {dtype}", 2 * m * n * k, b_in * (m * k + k * n) + b_out * m * n
    )


def decode_gemv(d_in: int, d_out: int, batch: int = 1, dtype: str = "bf16") -> OpCost:
    """One decode step through a weight matrix: the weight read dominates, intensity ~ batch."""
    return gemm(batch, d_out, d_in, dtype)


def attention(
    batch: int, heads: int, seq: int, head_dim: int, dtype: str = "bf16", fused: bool = True
) -> OpCost:
    """Forward causal attention (QK^T and AV, useful half). Fused (flash) kernels keep the score
    matrix on chip, so HBM traffic is q, k, v and the output; naive kernels also write and read
    the seq x seq scores and probabilities."""
    b = BYTES[dtype]
    flops = 2 * 2 * batch * heads * seq * seq * head_dim / 2
    io = 4 * batch * heads * seq * head_dim * b
    if not fused:  # scores written, read by softmax, probabilities written, read by AV
        io += 4 * batch * heads * seq * seq * b
    return OpCost(f"attention {'fused' if fused else 'naive'} seq {seq}", flops, io)


def elementwise(numel: int, flops_per_element: float = 1, inputs: int = 2, dtype: str = "bf16"):
    """An add/mul/activation: a few FLOPs per element against (inputs + 1) reads and writes."""
    return OpCost("elementwise", flops_per_element * numel, (inputs + 1) * numel * BYTES[dtype])


def rmsnorm(tokens: int, hidden: int, dtype: str = "bf16") -> OpCost:
    """Square, mean, rsqrt, scale, gain: about 4 FLOPs per element; reads x and writes y."""
    return OpCost("rmsnorm", 4 * tokens * hidden, 2 * tokens * hidden * BYTES[dtype] + hidden * 4)


def adamw_step(params: int) -> OpCost:
    """fp32 AdamW: reads param, grad, m, v and writes param, m, v (28 bytes); ~12 FLOPs each."""
    return OpCost("adamw step", 12 * params, 28 * params)


def roofline(op: OpCost, acc: Accelerator, dtype: str = "bf16", peak_tflops: float | None = None):
    """Where `op` sits on `acc`'s roofline; `peak_tflops` overrides the datasheet ceiling with a
    measured one (plan with measured ceilings: about 720 TFLOP/s bf16 on an H100 SXM)."""
    if acc.memory_bw_gbs <= 0:
        raise ValueError(f"{acc.name}: no memory bandwidth in the table, cannot draw a roofline")
    peak = peak_tflops * 1e12 if peak_tflops else acc.peak_flops(dtype)
    bw = acc.memory_bw_gbs * 1e9
    attainable = min(peak, op.intensity * bw)
    return Roofline(op, acc.name, dtype, peak, bw, peak / bw, attainable, op.flops / attainable)
