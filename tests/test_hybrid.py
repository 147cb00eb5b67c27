"""Hybrid models: Gated DeltaNet layers, the chunked algorithm, the recurrent cache, document
resets, counts, Qwen3-Next parity and export, and a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crucible.cli import main
from crucible.config import ConfigError, LinearAttentionConfig, ModelConfig, MoEConfig, load_config
from crucible.model import Transformer, export_hf, generate, load_hf
from crucible.model.deltanet import chunk_gated_delta_rule
from crucible.model.hf import model_config_from_hf, to_hf_config
from crucible.plan.flops import attention_flops_per_token, train_flops_per_token
from crucible.plan.kvcache import kv_cache_bytes_per_token
from crucible.plan.params import count_params

LINEAR = dict(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=6, chunk_size=4)
BASE = dict(
    vocab_size=97,
    hidden_size=32,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    max_seq_len=128,
    norm_eps=1e-6,
    qk_norm=True,
    attn_output_gate=True,
    init_std=0.05,
)


def cfg_with(pattern=("linear", "linear", "linear", "full"), **kw) -> ModelConfig:
    """BASE with Gated DeltaNet layers by `pattern` (None: only full attention)."""
    la_kw = {**LINEAR, **kw.pop("la", {})}
    la = None if pattern is None else LinearAttentionConfig(pattern=list(pattern), **la_kw)
    return ModelConfig(**{**BASE, **kw}, linear_attention=la)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains and biases, so a swapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("dt_bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(T: int = 21, B: int = 2, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, BASE["vocab_size"], (B, T), generator=gen)


# --------------------------------------------------------------------------- the delta rule


def step_by_step(q, k, v, g, beta, state=None, starts=None):
    """The gated delta rule one token at a time, straight from its definition:
    S <- exp(g) S;  S <- S + k beta (v - S^T k)^T;  o = S^T q;  S <- 0 at a document start."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    outs, finals = [], []
    for b in range(B):
        row_o, row_s = [], []
        for h in range(H):
            S = torch.zeros(Dk, Dv, dtype=torch.float64) if state is None else state[b, h].double()
            col = []
            for t in range(T):
                if starts is not None and starts[b, t]:
                    S = torch.zeros_like(S)
                kt, vt, qt = k[b, t, h].double(), v[b, t, h].double(), q[b, t, h].double()
                S = S * torch.exp(g[b, t, h].double())
                S = S + torch.outer(kt, beta[b, t, h].double() * (vt - S.T @ kt))
                col.append(S.T @ qt)
            row_o.append(torch.stack(col))  # [T, Dv]
            row_s.append(S)
        outs.append(torch.stack(row_o, dim=1))  # [T, H, Dv]
        finals.append(torch.stack(row_s))
    return torch.stack(outs), torch.stack(finals)


def rule_inputs(B=2, T=13, H=3, Dk=5, Dv=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * 2  # decays exp(g) in (0.13, 1]
    beta = torch.rand(B, T, H, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("chunk", [1, 3, 4, 13, 64])
def test_chunked_rule_equals_step_by_step_reference(chunk: int) -> None:
    q, k, v, g, beta = rule_inputs()
    state0 = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    starts = torch.zeros(2, 13, dtype=torch.bool)
    starts[0, [4, 8, 9]] = True  # a one-token document, and a start on a chunk edge (chunk 4)
    starts[1, 3] = True
    for init, st in [(None, None), (state0, None), (None, starts)]:
        o, S = chunk_gated_delta_rule(q, k, v, g, beta, chunk, init, st)
        ro, rS = step_by_step(q, k, v, g, beta, init, st)
        torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(S.double(), rS, atol=2e-5, rtol=1e-5)


def test_chunked_rule_gradients_equal_the_reference() -> None:
    inputs = [x.double().requires_grad_() for x in rule_inputs(B=1, T=9, H=2)]
    o, _ = chunk_gated_delta_rule(*inputs, chunk_size=4)
    grads = torch.autograd.grad(o.square().sum(), inputs)
    ref_in = [x.detach().clone().requires_grad_() for x in inputs]
    ro, _ = step_by_step(*ref_in)
    ref = torch.autograd.grad(ro.square().sum(), ref_in)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # fp32 inside


def test_chunked_rule_stays_fp32_under_autocast() -> None:
    inputs = rule_inputs(T=40)
    ref, _ = chunk_gated_delta_rule(*inputs, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the matmuls in bf16
        out, _ = chunk_gated_delta_rule(*inputs, chunk_size=16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- model


def test_layer_pattern_builds_the_right_mixers() -> None:
    model = build(cfg_with(pattern=["linear", "full"]))
    kinds = ["linear" if hasattr(b, "linear_attn") else "full" for b in model.layers]
    assert kinds == ["linear", "full", "linear", "full"]
    assert model.layers[1].self_attn.q_proj.out_features == 2 * 4 * 8  # query + output gate


def test_incremental_decoding_equals_the_full_forward() -> None:
    model = build(cfg_with())
    x = ids(T=23)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(batch_size=2)
        parts = [model(x[:, :9], cache=cache).logits]  # a prefill spanning several chunks
        for t in range(9, 14):  # single tokens
            parts.append(model(x[:, t : t + 1], cache=cache).logits)
        parts.append(model(x[:, 14:], cache=cache).logits)  # a chunk after decoding
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_equals_recomputing_the_full_sequence() -> None:
    model = build(cfg_with())
    prompt = ids(T=7, B=1)[0].tolist()
    ours = generate(model, prompt, max_new_tokens=20, temperature=0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert ours == seq[len(prompt) :]


def test_forked_cache_continues_like_the_original() -> None:
    model = build(cfg_with())
    x = ids(T=10, B=1)
    with torch.no_grad():
        cache = model.new_cache(batch_size=1)
        model(x[:, :6], cache=cache)
        forked = cache.fork(3)
        ref = model(x[:, 6:], cache=cache).logits
        out = model(x[:, 6:].expand(3, -1), cache=forked).logits
    torch.testing.assert_close(out, ref.expand(3, -1, -1), atol=1e-6, rtol=1e-6)


def test_packed_documents_do_not_leak_through_the_state() -> None:
    model = build(cfg_with(doc_masking=True))
    lengths = [5, 1, 4, 9]  # starts at 5, 6, 10 (a chunk edge for chunk 4 is 4, 8, 12...)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    x = ids(T=sum(lengths), B=1)
    with torch.no_grad():
        packed = model(x, doc_ids=doc_ids).logits
        alone = torch.cat(
            [model(part).logits for part in x.split(lengths, dim=1)], dim=1
        )  # each document on its own
        leaky = model(x).logits  # no doc_ids: the state runs through
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (leaky[:, 5:] - alone[:, 5:]).abs().max() > 1e-3


def test_packed_documents_train_with_finite_gradients() -> None:
    model = build(cfg_with(doc_masking=True)).train()
    x = ids(T=17, B=2)
    doc_ids = (torch.arange(17) >= 8).long().expand(2, -1)
    loss = model(x, x, doc_ids=doc_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- config


def test_config_errors_are_one_clear_line() -> None:
    with pytest.raises(
        ValueError, match="pattern has 3 entries, which does not divide num_layers 4"
    ):
        cfg_with(pattern=["linear", "linear", "full"])
    with pytest.raises(ValueError, match="num_value_heads 3 must be a multiple of num_key_heads 2"):
        cfg_with(la={"num_value_heads": 3})
    with pytest.raises(ValueError, match="rotates 1 of 8 head dims"):
        cfg_with(partial_rotary_factor=0.2)
    with pytest.raises(ConfigError, match="does not divide num_layers"):
        load_config("tiny-hybrid", ["model.linear_attention.pattern=[linear,full,full]"])


def test_fla_kernels_without_fla_is_a_config_error() -> None:
    from crucible.model import deltanet

    if deltanet._fla_chunk is not None:
        pytest.skip("flash-linear-attention is installed")
    with pytest.raises(ConfigError, match="kernels=fla needs the flash-linear-attention"):
        Transformer(cfg_with(la={"kernels": "fla"}))


def test_cli_refuses_a_bad_pattern_before_any_work(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "tiny-hybrid", "model.linear_attention.pattern=[linear,linear,full]"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "does not divide num_layers 4" in err


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"attention_bias": True, "tie_embeddings": False},
        {"pattern": ["full", "linear"], "la": {"conv_kernel": 2, "num_value_heads": 2}},
        {"moe": MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=16)},
        {"moe": MoEConfig(num_experts=4, top_k=2, shared_experts=1, shared_expert_gate=True)},
        {"pattern": ["full"], "attn_output_gate": False},
    ],
)
def test_param_count_equals_the_built_model(kw: dict) -> None:
    cfg = cfg_with(**kw)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_flops_count_attention_only_on_full_layers() -> None:
    hybrid = cfg_with()
    dense = ModelConfig(**BASE)
    one_full = ModelConfig(**{**BASE, "num_layers": 1})
    # The seq_len-dependent part comes from the one full-attention layer; the linear layers add a
    # constant that does not grow with the sequence.
    grow = attention_flops_per_token(hybrid, 512) - attention_flops_per_token(hybrid, 256)
    assert grow == attention_flops_per_token(one_full, 512) - attention_flops_per_token(
        one_full, 256
    )
    assert attention_flops_per_token(hybrid, 256) > attention_flops_per_token(one_full, 256)
    assert train_flops_per_token(hybrid, 4096) < train_flops_per_token(dense, 4096)
    assert kv_cache_bytes_per_token(hybrid) == kv_cache_bytes_per_token(one_full)


def run_cli(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0


def test_count_params_cli_reads_the_same_source(capsys) -> None:
    run_cli(["count-params", "tiny-hybrid"])
    total = count_params(load_config("tiny-hybrid").model).total
    assert f"{total:,}" in capsys.readouterr().out


# --------------------------------------------------------------------------- Qwen3-Next


EXPORTS = {
    "3linear-1full": {},
    "alternating-untied-bias-partial-rope": {
        "pattern": ["linear", "full"],
        "tie_embeddings": False,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
    },
    "equal-heads-conv2": {"la": {"num_value_heads": 2, "value_head_dim": 8, "conv_kernel": 2}},
    "gated-attention-only": {"pattern": None},
    "moe-gated-shared-expert": {
        "moe": MoEConfig(
            num_experts=4,
            top_k=2,
            expert_intermediate_size=16,
            shared_experts=2,
            shared_expert_gate=True,
            aux_loss_coef=0.02,
        )
    },
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_matches_transformers_qwen3_next(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = build(cfg_with(**EXPORTS[name]))
    out = export_hf(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_next"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3NextForCausalLM"
    x = ids(T=70)  # longer than transformers' 64-token chunk and many of ours
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert ours.abs().max() > 1  # logits large enough for the comparison to mean something
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, f"max |logit diff| {diff:.2e}"
    print(f"{name}: max |logit| {ours.abs().max():.2f}, max |diff| {diff:.2e}")

    prompt = x[:1, :6]
    mine = generate(model, prompt, max_new_tokens=20, temperature=0)
    ref = hf.generate(
        prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None
    )[0, 6:].tolist()
    assert mine == ref

    loaded = load_hf(out)
    assert loaded.cfg == model.cfg
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)  # (w - 1) + 1 rounds


def test_load_a_checkpoint_written_by_transformers(tmp_path: Path) -> None:
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    d = to_hf_config(cfg_with())
    for key in ("crucible_linear_attention", "partial_rotary_factor", "rope_parameters"):
        d.pop(key)  # transformers' defaults: partial RoPE over a quarter of each head
    torch.manual_seed(0)
    hf = Qwen3NextForCausalLM(Qwen3NextConfig(**{k: v for k, v in d.items() if k != "model_type"}))
    with torch.no_grad():  # transformers initialises norms to 0 (gain 1): perturb them
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval().save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert model.cfg.partial_rotary_factor == 0.25 and model.cfg.rope_dim == 2
    x = ids(T=30)
    with torch.no_grad():
        diff = (model(x).logits - hf(x).logits).abs().max().item()
    assert diff < 1e-5


def test_load_a_qwen3_next_moe_checkpoint_written_by_transformers(tmp_path: Path) -> None:
    """transformers' own defaults (layer pattern, partial RoPE, norms, MoE with a gated shared
    expert), only shrunk: the structure of published Qwen3-Next checkpoints."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    hc = Qwen3NextConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=48,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = Qwen3NextForCausalLM(hc)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "gate" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval().save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    c = model.cfg
    assert c.linear_attention.pattern == ["linear", "linear", "linear", "full"]
    assert c.moe.shared_experts == 2 and c.moe.shared_expert_gate and c.rope_dim == 4
    x = ids(T=30)
    with torch.no_grad():
        diff = (model(x).logits - hf(x).logits).abs().max().item()
    assert diff < 1e-5


def test_export_and_import_errors() -> None:
    with pytest.raises(ValueError, match="no QK-norm off"):
        to_hf_config(cfg_with(qk_norm=False))
    with pytest.raises(ValueError, match="no ungated attention"):
        to_hf_config(cfg_with(attn_output_gate=False))
    with pytest.raises(ValueError, match="no MoE without a gated shared expert"):
        to_hf_config(cfg_with(moe=MoEConfig(num_experts=4, top_k=2)))
    with pytest.raises(ValueError, match="shared_expert_gate needs shared_experts >= 1"):
        MoEConfig(shared_expert_gate=True)
    with pytest.raises(ValueError, match="cannot export partial RoPE"):
        to_hf_config(ModelConfig(**{**BASE, "attn_output_gate": False}, partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="dense MLPs among the MoE ones"):
        model_config_from_hf(
            {"model_type": "qwen3_next", "num_hidden_layers": 4, "mlp_only_layers": [0]}
        )


# --------------------------------------------------------------------------- training


def test_tiny_hybrid_trains_through_the_cli(small_overrides: list[str], tmp_path: Path) -> None:
    small = [o for o in small_overrides if not o.startswith("model.num_layers")]
    run_cli(
        [
            "train",
            "tiny-hybrid",
            *small,
            "model.num_layers=4",
            "model.linear_attention.key_head_dim=16",
            "model.linear_attention.value_head_dim=16",
            "model.doc_masking=true",
            "train.steps=3",
            "train.val_every=0",
            "train.threads=1",
            "checkpoint.every=3",
            "monitor.every=2",  # detailed snapshots hook the (gated) attention layer too
            "name=hybrid",
        ]
    )
    cfg = load_config("tiny-hybrid", [*small, "model.num_layers=4", "name=hybrid"])
    run = cfg.run_dir
    assert (run / "checkpoints/step_000003/model.safetensors").exists()
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert losses and all(loss == loss and loss < 20 for loss in losses)
    assert any(r.get("event") == "monitor_detail" for r in logged)

    # The trained run exports through the CLI and runs the same in transformers.
    from transformers import AutoModelForCausalLM

    from crucible.runs import load_run_model

    run_cli(["export", str(run), "--out", str(tmp_path / "hf")])
    ours = load_run_model(run)[0].float().eval()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max() < 1e-5


def test_hybrid_resume_is_bit_exact_with_activation_checkpointing(small_overrides) -> None:
    from safetensors.torch import load_file

    from crucible.train.trainer import train

    small = [o for o in small_overrides if not o.startswith("model.num_layers")]
    hyb = [
        *small,
        "model.num_layers=4",
        "model.linear_attention.key_head_dim=16",
        "model.linear_attention.value_head_dim=16",
        "model.linear_attention.chunk_size=16",
        "train.activation_checkpointing=full",
        "train.dtype=fp32",
        "train.steps=4",
        "checkpoint.every=2",
        "train.val_every=0",
    ]
    ref = load_config("tiny-hybrid", [*hyb, "name=ref"])
    train(ref, quiet=True)
    train(load_config("tiny-hybrid", [*hyb, "name=cut", "train.stop_at=2"]), quiet=True)
    train(load_config("tiny-hybrid", [*hyb, "name=cut"]), resume=True, quiet=True)
    a = load_file(str(ref.run_dir / "checkpoints/step_000004/model.safetensors"))
    b = load_file(str(ref.run_dir.parent / "cut/checkpoints/step_000004/model.safetensors"))
    assert "layers.0.linear_attn.A_log" in a and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tensor_parallel_hybrid_is_refused_before_any_work() -> None:
    from crucible.train.distributed import check_parallel_config

    cfg = load_config("tiny-hybrid", ["distributed.tp=2"])
    with pytest.raises(ConfigError, match="tensor parallelism does not split Gated DeltaNet"):
        check_parallel_config(cfg, world=2, device_type="cuda")
