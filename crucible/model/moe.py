"""Mixture-of-experts feed-forward layer: top-k routing, dropless dispatch, load balancing.

Per token, a linear router scores the experts (softmax or sigmoid), the top_k are picked (with
DeepSeek-V3's selection bias added for the choice only, when aux-loss-free balancing is on) and
their SwiGLU outputs are summed with the (optionally renormalised) scores as weights, plus the
always-on shared experts. Dispatch sorts the token copies by expert so each expert sees one
contiguous slice, then runs all experts in one `torch._grouped_mm` or a loop over the slices.

Parameter names follow transformers' fused MoE layout (Qwen3-MoE in transformers 5):
`gate.weight` [E, D], `experts.gate_up_proj` [E, 2I, D] (gate rows first), `experts.down_proj`
[E, D, I], and `shared_experts.{gate,up,down}_proj` for the shared experts.

Balancing statistics (`moe_stats`, the bias update) are kept in plain tensor attributes rather
than buffers: DDP broadcasts buffers from rank 0 before each forward pass, which would overwrite
every other rank's counts. The selection bias itself is a persistent buffer, so checkpoints carry
it and resume is exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from crucible.config import ModelConfig, MoEConfig
from crucible.model.autocast import active_autocast_dtype
from crucible.model.mlp import MLP

# --------------------------------------------------------------------------- routing


def route(
    logits: Tensor, moe: MoEConfig, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Router logits [N, E] (fp32) -> (weights [N, k], expert ids [N, k], scores [N, E]).

    The bias only changes which experts are picked; the weights come from the unbiased scores.
    """
    scores = logits.softmax(-1) if moe.score == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    idx = torch.topk(choice, moe.top_k, dim=-1).indices
    weights = scores.gather(-1, idx)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if moe.routed_scaling != 1.0:
        weights = weights * moe.routed_scaling
    return weights, idx, scores


def load_balancing_loss(scores: Tensor, idx: Tensor, num_experts: int) -> Tensor:
    """Switch-style balance loss E * sum_i f_i * P_i; 1.0 when perfectly balanced.

    f_i: the share of the N*k token-to-expert assignments that went to expert i (sums to 1).
    P_i: the mean over tokens of expert i's router probability (sigmoid scores are first
    normalised over the experts so that they sum to 1 per token).
    """
    counts = torch.bincount(idx.flatten(), minlength=num_experts).to(scores.dtype)
    f = counts / idx.numel()
    probs = scores / scores.sum(-1, keepdim=True)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(router logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# --------------------------------------------------------------------------- dispatch


def grouped_mm_works(device: torch.device, dtype: torch.dtype, hidden: int, inner: int) -> bool:
    """Whether `torch._grouped_mm` runs the expert matmuls for this device, dtype and shape.

    Kernels differ in the dtypes and alignments they accept, so rather than encode the rules,
    run both matmuls of a two-expert SwiGLU once per (device, dtype, shape) and compare them
    with the loop; remember the answer.
    """
    key = (str(device), dtype, hidden, inner)
    if key not in _GROUPED_OK:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(24, hidden, device=device, generator=g).to(dtype)
            gate_up = torch.randn(2, 2 * inner, hidden, device=device, generator=g).to(dtype)
            down = torch.randn(2, hidden, inner, device=device, generator=g).to(dtype)
            counts = torch.tensor([16, 8], device=device)
            got = expert_swiglu(x, counts, gate_up, down, "grouped_mm").float()
            want = expert_swiglu(x, counts, gate_up, down, "loop").float()
            _GROUPED_OK[key] = bool(
                torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max())
            )
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _GROUPED_OK[key] = False
    return _GROUPED_OK[key]


_GROUPED_OK: dict[tuple[str, torch.dtype, int, int], bool] = {}


@torch.compiler.disable
def _pick_dispatch(choice: str, x: Tensor, down: Tensor) -> str:
    if choice != "auto":
        return choice
    # On CPU torch's grouped_mm is itself a loop, and slower than ours for bf16 (measured).
    hidden, inner = down.shape[1], down.shape[2]
    dtype = active_autocast_dtype(x.device.type) or x.dtype
    if x.device.type == "cuda" and grouped_mm_works(x.device, dtype, hidden, inner):
        return "grouped_mm"
    return "loop"


def expert_swiglu(
    x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor, dispatch: str = "loop"
) -> Tensor:
    """SwiGLU of every expert on its slice of x [N, D], sorted by expert with `counts` [E] rows
    each: down_e(silu(gate_e(x)) * up_e(x)) with gate_up [E, 2I, D] and down [E, D, I]."""
    if dispatch == "grouped_mm":
        dt = active_autocast_dtype(x.device.type)
        if dt is not None:  # cast as autocast would for a matmul
            x, gate_up, down = x.to(dt), gate_up.to(dt), down.to(dt)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)
    if dispatch != "loop":
        raise ValueError(f"unknown MoE dispatch {dispatch!r}; allowed: grouped_mm, loop")
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            g, u = F.linear(x[start : start + n], gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(g) * u, down[e]))
            start += n
    if not outs:
        return x.new_zeros(0, down.shape[1])
    return torch.cat(outs)


# --------------------------------------------------------------------------- the layer


class Experts(nn.Module):
    """The routed experts' weights as two 3-D parameters (one grouped matmul each)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)


class MoE(nn.Module):
    """Routed experts (+ shared experts) in place of a block's MLP.

    forward(x) returns (y, aux): aux holds this layer's unweighted balance loss and router
    z-loss while training (empty otherwise); the model weights and adds them to its loss.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.moe = moe = cfg.moe
        d = cfg.hidden_size
        self.gate = nn.Linear(d, moe.num_experts, bias=False)  # the router
        self.experts = Experts(moe.num_experts, d, moe.expert_intermediate_size)
        self.shared_experts = (
            MLP(d, moe.shared_experts * moe.expert_intermediate_size)
            if moe.shared_experts
            else None
        )
        # Qwen3-Next: a per-token sigmoid gate on the shared experts' output.
        self.shared_expert_gate = nn.Linear(d, 1, bias=False) if moe.shared_expert_gate else None
        self.expert_bias: Tensor | None
        if moe.bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts), persistent=True)
        else:
            self.expert_bias = None
        # Token-to-expert assignment counts (see the module docstring for why not buffers).
        self.step_load: Tensor | None = None  # since the last bias update
        self.stat_load: Tensor | None = None  # since the last moe_stats() call

    @torch.no_grad()
    def reset_buffers(self) -> None:
        if self.expert_bias is not None:
            self.expert_bias.zero_()
        self.step_load = self.stat_load = None

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        moe = self.moe
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, k, E = x.shape[0], moe.top_k, moe.num_experts
        # The router in fp32 even under autocast: near-ties between experts flip in bf16.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        bias = self.expert_bias.float() if self.expert_bias is not None else None
        weights, idx, scores = route(logits, moe, bias)

        # Sort the N*k token copies by expert (stable: tokens keep their order within an expert).
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        # expand + reshape instead of x[order // k]: the backward is then a sum over k, not an
        # index_add with repeated indices (non-deterministic on GPU).
        x_sorted = x.unsqueeze(1).expand(N, k, x.shape[-1]).reshape(N * k, -1)[order]
        y_sorted = expert_swiglu(
            x_sorted,
            counts,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            _pick_dispatch(moe.dispatch, x_sorted, self.experts.down_proj),
        )
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = y_sorted[inverse].view(N, k, -1)
        y = (y.to(weights.dtype) * weights.unsqueeze(-1)).sum(1)  # weights are fp32
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        y = y.to(x.dtype).view(shape)

        aux: dict[str, Tensor] = {}
        if self.training:
            with torch.no_grad():
                c = counts.float()
                self.stat_load = c if self.stat_load is None else self.stat_load + c
                if self.expert_bias is not None:
                    self.step_load = c if self.step_load is None else self.step_load + c
            aux["aux_loss"] = load_balancing_loss(scores, idx, E)
            aux["z_loss"] = router_z_loss(logits)
        return y, aux

    def take_stats(self) -> Tensor | None:
        """Assignment counts per expert since the last call (None if no training forward)."""
        load, self.stat_load = self.stat_load, None
        return load


# --------------------------------------------------------------------------- model helpers


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_router_bias(model: nn.Module) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing; call once after every optimizer step.

    Each expert's selection bias moves by `bias_update_rate` towards balance: down when it
    received more than the mean load since the last update, up when less (the sign of the load
    error). Under torch.distributed the loads are summed over ranks first, so every rank applies
    the same update. A no-op for dense models and MoE without `bias_update_rate`.
    """
    layers = [m for m in moe_layers(model) if m.expert_bias is not None]
    if not layers:
        return
    E = layers[0].moe.num_experts
    bias = layers[0].expert_bias
    assert bias is not None
    loads = torch.stack(
        [m.step_load if m.step_load is not None else bias.new_zeros(E) for m in layers]
    ).to(bias.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads)
    for m, load in zip(layers, loads, strict=True):
        m.step_load = None
        if load.sum() > 0:
            assert m.expert_bias is not None
            error = load.mean() - load  # > 0: under-loaded, raise its bias
            m.expert_bias.add_(m.moe.bias_update_rate * torch.sign(error))


def moe_stats(model: nn.Module) -> dict[str, float]:
    """Per-layer expert load since the last call, as floats for logging.

    For layer i: `moe/i/load_j` (share of the token-to-expert assignments that went to expert j),
    `moe/i/max_over_mean` (1.0 is perfect balance) and `moe/i/cv` (coefficient of variation of
    the loads); plus `moe/max_over_mean` and `moe/cv`, the worst layer. Empty for dense models or
    when no training forward ran since the last call.
    """
    out: dict[str, float] = {}
    worst_mom, worst_cv = 0.0, 0.0
    for i, m in enumerate(moe_layers(model)):
        load = m.take_stats()
        if load is None or load.sum() == 0:
            continue
        share = (load / load.sum()).cpu()
        mean = share.mean()
        mom = float(share.max() / mean)
        cv = float(share.std(unbiased=False) / mean)
        for j, s in enumerate(share.tolist()):
            out[f"moe/{i}/load_{j}"] = s
        out[f"moe/{i}/max_over_mean"] = mom
        out[f"moe/{i}/cv"] = cv
        worst_mom, worst_cv = max(worst_mom, mom), max(worst_cv, cv)
    if out:
        out["moe/max_over_mean"] = worst_mom
        out["moe/cv"] = worst_cv
    return out
