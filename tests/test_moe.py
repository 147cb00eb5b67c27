"""Mixture-of-experts: routing, dispatch, balancing losses and bias, counts, HF parity, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from crucible.config import ConfigError, ModelConfig, MoEConfig, load_config
from crucible.model import Transformer, export_hf, generate, load_hf
from crucible.model.hf import model_config_from_hf
from crucible.model.moe import (
    MoE,
    expert_swiglu,
    load_balancing_loss,
    moe_stats,
    route,
    router_z_loss,
    update_router_bias,
)
from crucible.plan.flops import matmul_params
from crucible.plan.params import count_params

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    max_seq_len=64,
    norm_eps=1e-6,
    qk_norm=True,
    init_std=0.1,
)


def cfg_with(**moe) -> ModelConfig:
    return ModelConfig(
        **BASE,
        moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_intermediate_size": 16, **moe}),
    )


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norm gains, so a swapped tensor cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(T: int = 20, B: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(
        0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed)
    )


# --------------------------------------------------------------------------- routing


def test_route_softmax_and_sigmoid_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0]])
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=1)
    w, idx, _ = route(logits, moe)
    e = [math.exp(v) for v in logits[0].tolist()]
    p = [v / sum(e) for v in e]
    assert idx.tolist() == [[0, 2]]
    assert w[0].tolist() == pytest.approx([p[0] / (p[0] + p[2]), p[2] / (p[0] + p[2])])
    w, _, _ = route(logits, moe.model_copy(update={"norm_topk_prob": False}))
    assert w[0].tolist() == pytest.approx([p[0], p[2]])

    sig = moe.model_copy(
        update={"score": "sigmoid", "norm_topk_prob": False, "routed_scaling": 2.5}
    )
    w, idx, _ = route(logits, sig)
    s = [1 / (1 + math.exp(-v)) for v in logits[0].tolist()]
    assert idx.tolist() == [[0, 2]]
    assert w[0].tolist() == pytest.approx([2.5 * s[0], 2.5 * s[2]])
    # The bias changes only the choice; the weight is still the unbiased score.
    w, idx, _ = route(logits, sig, bias=torch.tensor([0.0, 0.5, -0.5, 0.0]))
    assert idx.tolist() == [[1, 0]]  # sigmoid(0.5) + 0.5 > sigmoid(2) + 0
    assert w[0].tolist() == pytest.approx([2.5 * s[1], 2.5 * s[0]])


def test_top_k_above_num_experts_is_one_clear_line() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny-moe", ["model.moe.top_k=9"])
    lines = str(e.value).splitlines()
    assert lines[1].strip() == "model.moe: top_k 9 exceeds num_experts 8; allowed: 1..8"


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_paths_agree_with_per_expert_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    E, D, H = 5, 16, 24
    counts = torch.tensor([3, 0, 7, 1, 0])  # empty experts included
    x = torch.randn(int(counts.sum()), D, generator=g).to(dtype)
    gate_up = (torch.randn(E, 2 * H, D, generator=g) * 0.2).to(dtype)
    down = (torch.randn(E, D, H, generator=g) * 0.2).to(dtype)
    ref, start = [], 0
    for e, n in enumerate(counts.tolist()):  # one token at a time, straight from the formula
        for row in x[start : start + n].float():
            gate, up = gate_up[e].float()[:H] @ row, gate_up[e].float()[H:] @ row
            ref.append(down[e].float() @ (F.silu(gate) * up))
        start += n
    ref = torch.stack(ref)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    outs, grads = {}, {}
    for path in ("loop", "grouped_mm"):
        xs, gu, dn = (t.clone().requires_grad_() for t in (x, gate_up, down))
        outs[path] = expert_swiglu(xs, counts, gu, dn, path)
        outs[path].float().pow(2).sum().backward()
        grads[path] = (xs.grad, gu.grad, dn.grad)
        torch.testing.assert_close(outs[path].float(), ref, atol=tol, rtol=tol)
    for a, b in zip(grads["loop"], grads["grouped_mm"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 matmuls
        loop = expert_swiglu(x.float(), counts, gate_up.float(), down.float(), "loop")
        grouped = expert_swiglu(x.float(), counts, gate_up.float(), down.float(), "grouped_mm")
    assert loop.dtype == grouped.dtype == torch.bfloat16
    torch.testing.assert_close(loop.float(), grouped.float(), atol=3e-2, rtol=3e-2)


def test_moe_layer_matches_a_per_token_reference() -> None:
    cfg = cfg_with(shared_experts=1, score="sigmoid", bias_update_rate=0.1, routed_scaling=1.5)
    layer = build(cfg).layers[0].mlp
    assert isinstance(layer, MoE)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    y, _ = layer(x)
    gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
    H = cfg.moe.expert_intermediate_size
    for t in range(7):
        s = torch.sigmoid(layer.gate.weight @ x[t])
        chosen = torch.topk(s + layer.expert_bias, 2).indices
        w = s[chosen] / s[chosen].sum() * 1.5
        want = layer.shared_experts(x[t])
        for e, we in zip(chosen.tolist(), w, strict=True):
            want = want + we * (dn[e] @ (F.silu(gu[e, :H] @ x[t]) * (gu[e, H:] @ x[t])))
        torch.testing.assert_close(y[t], want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- balancing


def test_balance_and_z_losses_by_hand() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [0.0, 3.0, 0.0], [1.0, 2.0, 0.0]])
    moe = MoEConfig(num_experts=3, top_k=2, expert_intermediate_size=1)
    _, idx, scores = route(logits, moe)
    # Hand: counts of each expert among the 8 assignments, mean softmax probability per expert.
    counts = [sum(row.count(e) for row in idx.tolist()) for e in range(3)]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    mean_p = [sum(p[e] for p in probs) / 4 for e in range(3)]
    want = 3 * sum(counts[e] / 8 * mean_p[e] for e in range(3))
    assert load_balancing_loss(scores, idx, 3).item() == pytest.approx(want, rel=1e-6)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert router_z_loss(logits).item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    # Perfect balance gives exactly 1.
    uniform = torch.full((4, 3), 1 / 3)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0]]), 3).item() == (
        pytest.approx(1 / 3 * 3 * (2 / 4 + 1 / 4 + 1 / 4))
    )


def test_model_loss_includes_weighted_aux_terms_when_training() -> None:
    cfg = cfg_with(aux_loss_coef=0.05, router_z_loss=0.002)
    model = build(cfg)
    x = ids()
    model.eval()
    lm = model(x, x).loss
    assert model(x, x).aux == {}
    model.train()
    out = model(x, x)
    # Recompute each layer's terms from its router input, captured by hooks.
    inputs: list[torch.Tensor] = []
    hooks = [
        blk.mlp.register_forward_hook(lambda m, a, o: inputs.append(a[0])) for blk in model.layers
    ]
    model(x, x)
    for h in hooks:
        h.remove()
    terms_bal, terms_z = [], []
    for blk, h in zip(model.layers, inputs, strict=True):
        logits = F.linear(h.reshape(-1, 32), blk.mlp.gate.weight)
        _, idx, scores = route(logits, cfg.moe)
        terms_bal.append(load_balancing_loss(scores, idx, 4))
        terms_z.append(router_z_loss(logits))
    want = 0.05 * sum(terms_bal) + 0.002 * sum(terms_z)
    torch.testing.assert_close(out.loss, lm + want)
    torch.testing.assert_close(out.aux["moe_loss"], want.detach())
    torch.testing.assert_close(out.aux["moe_aux_loss"], (sum(terms_bal) / 2).detach())
    torch.testing.assert_close(out.aux["moe_z_loss"], (sum(terms_z) / 2).detach())
    out.loss.backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_bias_update_follows_the_load_error_and_is_checkpointed() -> None:
    cfg = cfg_with(bias_update_rate=0.01, aux_loss_coef=0.0)
    model = build(cfg).train()
    layer = model.layers[0].mlp
    model(ids(), ids())
    load = layer.step_load.clone()
    assert load.sum() == 2 * 20 * 2  # tokens x top_k
    update_router_bias(model)
    want = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.expert_bias, want)
    assert layer.step_load is None
    update_router_bias(model)  # no forward since: nothing moves
    torch.testing.assert_close(layer.expert_bias, want)
    assert "layers.0.mlp.expert_bias" in model.state_dict()
    assert "layers.0.mlp.expert_bias" not in build(cfg_with()).state_dict()  # rate 0: no bias


def test_moe_stats_per_layer_load_and_balance() -> None:
    model = build(cfg_with()).train()
    model(ids(), ids())
    model(ids(seed=4), ids(seed=4))
    stats = moe_stats(model)
    for i in range(2):
        loads = [stats[f"moe/{i}/load_{j}"] for j in range(4)]
        assert sum(loads) == pytest.approx(1.0)
        assert stats[f"moe/{i}/max_over_mean"] == pytest.approx(max(loads) * 4)
        mean = 0.25
        cv = math.sqrt(sum((v - mean) ** 2 for v in loads) / 4) / mean
        assert stats[f"moe/{i}/cv"] == pytest.approx(cv, rel=1e-5)
    assert stats["moe/cv"] == max(stats["moe/0/cv"], stats["moe/1/cv"])
    assert moe_stats(model) == {}  # accumulated since the last call only


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "moe", [{}, {"shared_experts": 2, "bias_update_rate": 0.1}, {"top_k": 1, "num_experts": 3}]
)
def test_param_counts_match_the_built_model(moe: dict) -> None:
    cfg = cfg_with(**moe)
    model = Transformer(cfg)
    p = count_params(cfg)
    assert p.total == sum(t.numel() for t in model.parameters())
    # Active, independently: every parameter except the routed experts a token skips.
    layer = model.layers[0].mlp
    per_expert = layer.experts.gate_up_proj[0].numel() + layer.experts.down_proj[0].numel()
    skipped = cfg.num_layers * (cfg.moe.num_experts - cfg.moe.top_k) * per_expert
    assert p.active == p.total - skipped
    # FLOPs use active matmul parameters: no input embedding, the output head always.
    head = model.output_weight().numel()
    assert (
        matmul_params(cfg)
        == p.active - model.embed.weight.numel() * (1 if cfg.tie_embeddings else 2) - p.norm + head
    )


def test_olmoe_preset_matches_the_published_size() -> None:
    # OLMoE-1B-7B (Muennighoff et al. 2024, arXiv:2409.02060, and allenai/OLMoE-1B-7B-0924's
    # config.json): 6.9B total and 1.3B active parameters. Our qk-norm is per head where OLMoE's
    # spans all heads (61,440 fewer parameters in 6.9B), well inside the tolerance.
    p = count_params(load_config("olmoe-1b-7b").model)
    assert p.total == pytest.approx(6.9e9, rel=0.01)
    assert p.active == pytest.approx(1.3e9, rel=0.03)


def test_count_params_cli_prints_active(capsys) -> None:
    from crucible.cli import main

    with pytest.raises(SystemExit) as done:
        main(["count-params", "tiny-moe"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    p = count_params(load_config("tiny-moe").model)
    assert f"{p.total:,}" in out and f"{p.active:,}" in out


# --------------------------------------------------------------------------- transformers


EXPORTS = {
    "qwen3_moe-renorm": ({}, {}),
    "qwen3_moe-6e-top3-untied": (
        {"norm_topk_prob": False, "num_experts": 6, "top_k": 3},
        {"tie_embeddings": False},
    ),
    "glm4_moe-bias-shared": (
        {"score": "sigmoid", "shared_experts": 1, "bias_update_rate": 0.01, "routed_scaling": 2.0},
        {},
    ),
    "glm4_moe-no-qk-norm-no-shared": (
        {"score": "sigmoid", "norm_topk_prob": False, "bias_update_rate": 0.01},
        {"qk_norm": False, "tie_embeddings": False},
    ),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_moe_export_logits_generation_and_round_trip(name: str, tmp_path: Path) -> None:
    moe, extra = EXPORTS[name]
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(
        **{**BASE, **extra},
        moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_intermediate_size": 16, **moe}),
    )
    model = build(cfg).eval()
    for blk in model.layers:  # a selection bias large enough to change which experts run
        if blk.mlp.expert_bias is not None:
            blk.mlp.expert_bias.copy_(torch.randn(cfg.moe.num_experts) * 0.1)
    out = export_hf(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == name.split("-")[0]
    names = load_file(str(out / "model.safetensors"))
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in names  # published per-expert layout
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == config["architectures"][0]
    x = ids()
    with torch.no_grad():
        diff = (model(x).logits - hf(x).logits).abs().max().item()
    assert diff < 1e-5, f"max |logit diff| {diff:.2e}"

    prompt = x[:1, :6]
    ours = generate(model, prompt, max_new_tokens=24, temperature=0)
    theirs = hf.generate(
        prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None
    )[0, 6:].tolist()
    assert ours == theirs

    loaded = load_hf(out)
    assert loaded.cfg == model.cfg
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe"])
def test_load_a_checkpoint_written_by_transformers(arch: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )  # fmt: skip
    if arch == "qwen3_moe":
        hc = AutoConfig.for_model(arch, num_experts=4, **shape)
    else:
        hc = AutoConfig.for_model(
            arch, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0,
            use_qk_norm=True, routed_scaling_factor=1.5, num_mtp_layers=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 1.0},
            **shape,
        )  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.cfg.moe is not None and ours.cfg.moe.top_k == 2
    x = ids()
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    assert diff < 1e-5


def test_export_and_import_errors() -> None:
    for moe, words in [
        ({"shared_experts": 1}, "Qwen3-MoE, which has no shared experts"),
        ({"bias_update_rate": 1e-3}, "Qwen3-MoE, which has no aux-loss-free selection bias"),
        ({"num_experts": 1, "top_k": 1, "score": "sigmoid"}, "GLM-4-MoE.*single-expert"),
    ]:
        with pytest.raises(ValueError, match=words):
            export_hf(Transformer(cfg_with(**moe)), "/nonexistent/never-written")
    with pytest.raises(ValueError, match="QK-norm"):
        export_hf(
            Transformer(ModelConfig(**{**BASE, "qk_norm": False}, moe=cfg_with().moe)),
            "/nonexistent/never-written",
        )
    with pytest.raises(
        ValueError, match=r"'olmoe'.*supported: llama, smollm3, qwen3, qwen3_moe, glm4_moe"
    ):
        model_config_from_hf({"model_type": "olmoe"})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        model_config_from_hf(
            {"model_type": "qwen3_moe", "num_hidden_layers": 2, "mlp_only_layers": [0]}
        )
    with pytest.raises(ValueError, match="first_k_dense_replace 1"):
        model_config_from_hf({"model_type": "glm4_moe", "num_hidden_layers": 2})


# --------------------------------------------------------------------------- training


def test_train_moe_and_resume_bit_exact(small_overrides) -> None:
    from crucible.train.trainer import train

    moe = [
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        "model.moe.expert_intermediate_size=32",
        "model.moe.bias_update_rate=0.01",
        "train.dtype=fp32",
        "train.steps=4",
        "checkpoint.every=2",
        "train.val_every=0",
    ]
    ref = load_config("tiny", [*small_overrides, *moe, "name=ref"])
    train(ref, quiet=True)
    cut = load_config("tiny", [*small_overrides, *moe, "name=cut", "train.stop_at=2"])
    train(cut, quiet=True)
    train(load_config("tiny", [*small_overrides, *moe, "name=cut"]), resume=True, quiet=True)
    a = load_file(str(ref.run_dir / "checkpoints/step_000004/model.safetensors"))
    b = load_file(str(cut.run_dir.parent / "cut/checkpoints/step_000004/model.safetensors"))
    assert a.keys() == b.keys() and "layers.0.mlp.expert_bias" in a
    assert a["layers.0.mlp.expert_bias"].abs().sum() > 0  # the bias moved
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_router_reads_the_fp32_norm_output_under_autocast():
    """Dense projections share one bf16 cast of their input; the router must not get it (near-ties
    between experts flip when its input is rounded to bf16)."""
    cfg = load_config("tiny-moe", ["model.num_layers=2"]).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    seen: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, args) -> None:
            seen.setdefault(name, args[0].dtype)

        return hook

    layer = model.layers[0]
    layer.mlp.register_forward_pre_hook(record("moe"))
    layer.self_attn.q_proj.register_forward_pre_hook(record("q_proj"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, cfg.vocab_size, (1, 16)))
    assert seen == {"moe": torch.float32, "q_proj": torch.bfloat16}
