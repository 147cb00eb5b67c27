"""RoPE scaling (linear, dynamic NTK, YaRN): logits and greedy generation equal transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crucible.config import ConfigError, ModelConfig, RopeScalingConfig, load_config
from crucible.model import Transformer, export_hf, load_hf
from crucible.model.generate import generate

ORIGINAL, LONG = 64, 256
BASE = dict(
    vocab_size=97,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=96,
    rope_theta=500.0,  # a small base: low frequencies wrap within 256 positions
    init_std=0.1,
)
SCALINGS = {
    "linear": dict(type="linear", factor=4.0),
    "dynamic": dict(type="dynamic", factor=4.0, original_max_position_embeddings=ORIGINAL),
    "yarn": dict(type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL),
    "yarn-params": dict(
        type="yarn",
        factor=3.0,
        original_max_position_embeddings=ORIGINAL,
        beta_fast=16.0,
        beta_slow=2.0,
        attention_factor=1.3,
        truncate=False,
    ),  # fmt: skip
}
ARCHS = {"llama": {}, "smollm3": {"nope_interval": 2}}


def build(arch: str, scaling: str, max_seq_len: int = LONG) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        **BASE, **ARCHS[arch], max_seq_len=max_seq_len, rope_scaling=SCALINGS[scaling]
    )
    return Transformer(cfg).eval()


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_logits_match_transformers_beyond_original_length(arch, scaling, tmp_path):
    model = build(arch, scaling)
    out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["rope_parameters"]["rope_type"] == SCALINGS[scaling]["type"]
    x = torch.randint(0, BASE["vocab_size"], (2, LONG), generator=torch.Generator().manual_seed(1))
    ref = model(x).logits
    with torch.no_grad():
        theirs = _hf(out)(x).logits
    assert (ref - theirs).abs().max().item() <= 1e-5
    # Scaling matters: the unscaled model gives other logits beyond the original length.
    plain = Transformer(model.cfg.model_copy(update={"rope_scaling": None})).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        diff = (plain(x).logits - ref).abs().amax(dim=(0, 2))
    assert diff[ORIGINAL:].max() > 1e-3
    if scaling == "dynamic":  # the whole sequence is longer than the original: all rescaled
        assert diff[1:].min() > 1e-4  # position 0 has angle 0 at any frequency
    # Import gives back the same config (dynamic: max_seq_len = original x factor = LONG).
    loaded = load_hf(out)
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


@pytest.mark.parametrize("scaling", ["linear", "dynamic", "yarn"])
def test_greedy_generation_with_kv_cache_matches_transformers(scaling, tmp_path):
    """Prompt shorter than the original length, generation well past it (dynamic NTK rescales
    at every new token: the cached keys keep their old rotation, in both implementations)."""
    model = build("smollm3", scaling, max_seq_len=160)
    if scaling == "dynamic":
        rs = model.cfg.rope_scaling.model_copy(update={"factor": 2.5})
        model = Transformer(model.cfg.model_copy(update={"rope_scaling": rs})).eval()
    prompt = torch.randint(
        0, BASE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(2)
    )
    ours = generate(model, prompt, max_new_tokens=100, temperature=0)
    hf = _hf(export_hf(model, tmp_path / "hf"))
    with torch.no_grad():
        theirs = hf.generate(
            prompt, max_new_tokens=100, do_sample=False, min_new_tokens=100, pad_token_id=0
        )[0, 40:].tolist()
    assert len(ours) == 100
    assert ours == theirs
    # And our cached decoding equals the full forward pass at the same lengths.
    full = torch.cat([prompt[0], torch.tensor(ours[:-1])])[None]
    with torch.no_grad():
        assert model(full).logits[0, -1].argmax().item() == ours[-1]


def test_dynamic_within_original_length_is_plain_rope():
    model = build("llama", "dynamic")
    plain = Transformer(model.cfg.model_copy(update={"rope_scaling": None})).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, BASE["vocab_size"], (1, ORIGINAL))
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.rope_scaling={type: yarn, factor: 1.0}", "rope_scaling.factor must be > 1"),
        ("model.rope_scaling={type: linear, factor: 0.5}", "rope_scaling.factor must be > 1"),
        ("model.rope_scaling={type: ntk, factor: 2}", "model.rope_scaling.type"),
        ("model.rope_scaling={type: linear, factor: 2, beta_fast: 8}", "only apply to type yarn"),
        (
            "model.rope_scaling={type: yarn, factor: 2, original_max_position_embeddings: 4096}",
            "exceeds max_seq_len",
        ),
    ],
)
def test_bad_rope_scaling_is_one_clear_error(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert message in str(e.value)
    assert len([x for x in str(e.value).splitlines() if x.startswith("  ")]) == 1


def test_import_rejects_unsupported_rope_type(tmp_path):
    model = build("llama", "linear")
    out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}  # fmt: skip
    config["rope_scaling"] = None
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="supported: default, linear, dynamic, yarn"):
        load_hf(out)


def test_yarn_defaults_follow_the_paper():
    """Attention factor 0.1 ln(s) + 1; dimensions that rotate more than beta_fast=32 times over
    the original length keep their frequency, those rotating less than beta_slow=1 time are
    divided by s (theta 10k, head 64, original 4096: dims < 10 and > 22 by the paper's formula).
    """
    import math

    from crucible.model.rope import rope_inv_freq, scaled_inv_freq

    rs = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=4096)
    inv, af = scaled_inv_freq(64, 10000.0, rs, 4096)
    plain = rope_inv_freq(64, 10000.0)
    assert af == pytest.approx(0.1 * math.log(4.0) + 1)
    rotations = 4096 * plain / (2 * math.pi)
    fast, slow = rotations > 32, rotations < 1
    assert fast.sum() >= 8 and slow.sum() >= 8
    torch.testing.assert_close(inv[fast], plain[fast], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv[slow], plain[slow] / 4, rtol=1e-6, atol=0)


def test_context_extension_stage_from_a_checkpoint(small_overrides):
    """init_from a shorter-context run with another RoPE theta, length and batch: the weights
    carry over (RoPE holds none) and training continues from that step."""
    from safetensors.torch import load_file

    from crucible.train.trainer import train

    common = [*small_overrides, "train.val_every=0", "checkpoint.every=0", "train.dtype=fp32"]
    short = ["model.max_seq_len=32", "train.seq_len=32", "train.steps=3"]
    first = train(load_config("tiny", [*common, *short, "name=s1"]), quiet=True)
    stage2 = load_config("tiny", [*common, "name=s2", "train.steps=5", "model.max_seq_len=64",
                                  "train.seq_len=64", "model.rope_theta=100000",
                                  "train.global_batch_size=4", "train.micro_batch_size=4",
                                  f"checkpoint.init_from={first.checkpoint}"])  # fmt: skip
    second = train(stage2, quiet=True)
    events = [json.loads(x) for x in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "init_from" and events[0]["step"] == 3
    assert [e["step"] for e in events if e["event"] == "train"][-1] == 5
    a = load_file(str(first.checkpoint / "model.safetensors"))
    b = load_file(str(second.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def test_long_context_example_stages_resolve():
    root = Path(__file__).parent.parent / "examples" / "long-context"
    stages = [load_config(root / f) for f in
              ("stage1-256.yaml", "stage2-512.yaml", "stage3-1024.yaml")]  # fmt: skip
    assert [(c.model.max_seq_len, c.train.seq_len, c.model.rope_theta) for c in stages] == [
        (256, 256, 1e4), (512, 512, 1e5), (1024, 1024, 5e5)]  # fmt: skip
    assert stages[1].checkpoint.init_from.endswith("lc-stage1/checkpoints/step_000400")
    assert stages[2].checkpoint.init_from.endswith("lc-stage2/checkpoints/step_000460")
    shapes = {c.model.model_copy(update={"max_seq_len": 0, "rope_theta": 0}).model_dump_json()
              for c in stages}  # fmt: skip
    assert len(shapes) == 1  # same shapes: the weights carry over
    assert len({c.train.tokens_per_step for c in stages}) == 1
