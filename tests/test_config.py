from pathlib import Path

import pytest

from crucible.config import ConfigError, dump_config, load_config, preset_names


def test_presets_load_and_roundtrip(tmp_path: Path):
    assert {"tiny", "llama3.2-1b-ablation", "smollm3-3b"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        assert load_config(path) == cfg


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["optim.lr=3e-4", "model.num_layers=12", "optim.clip_grad=null"])
    assert cfg.optim.lr == 3e-4
    assert cfg.model.num_layers == 12
    assert cfg.optim.clip_grad is None


def test_unknown_key_is_an_error_with_suggestion(tmp_path: Path):
    path = tmp_path / "cfg.yaml"
    path.write_text("base: tiny\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "optim.lrr" in msg and "Did you mean 'lr'" in msg


def test_invalid_value_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["schedule.kind=exponential"])
    msg = str(e.value)
    assert "schedule.kind" in msg and "cosine" in msg and "wsd" in msg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        load_config("tiny", ["model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match="max_seq_len"):
        load_config("tiny", ["train.seq_len=100000"])


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(bad)


def test_nope_layers():
    cfg = load_config("smollm3-3b")
    nope = [i for i in range(cfg.model.num_layers) if not cfg.model.uses_rope(i)]
    assert nope == list(range(3, 36, 4))
    cfg = load_config("tiny", ["model.nope_layers=[0,2]"])
    assert [cfg.model.uses_rope(i) for i in range(4)] == [False, True, False, True]
