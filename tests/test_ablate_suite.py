"""Ablation suites: parsing, the resolved diff, warnings, and bad input caught before training."""

import pytest
import yaml

from crucible.ablate.suite import format_plan, load_suite, parse_suite, plan_arms, suite_names
from crucible.config import ConfigError


def _suite(tmp_path, data):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_suite(path)


def test_diff_params_and_warnings(tmp_path, small_base):
    s = _suite(tmp_path, {
        "baseline": {"config": "tiny", "overrides": small_base},
        "seeds": 2,
        "variants": {
            "mqa": ["model.num_kv_heads=1"],
            "untied": {"overrides": {"model.tie_embeddings": False,
                                     "model.intermediate_size": 64},
                       "acknowledge_multi_change": True},
            "two": {"overrides": ["optim.lr=1e-3", "schedule.kind=wsd"]},
        },
    })  # fmt: skip
    assert s.seeds == [0, 1] and s.name == "s"
    arms = {a.name: a for a in plan_arms(s)}
    assert arms["mqa"].changes == {"model.num_kv_heads": (2, 1)}
    assert arms["mqa"].params < arms["baseline"].params
    assert arms["mqa"].flops_per_token < arms["baseline"].flops_per_token
    untied = arms["untied"]
    assert set(untied.changes) == {"model.tie_embeddings", "model.intermediate_size"}
    assert not any("changes 2 things" in w for w in untied.warnings)  # acknowledged
    assert any("parameters move" in w for w in untied.warnings)  # +embedding: > 5%
    assert any("changes 2 things" in w for w in arms["two"].warnings)
    text = format_plan(s, list(arms.values()))
    assert "model.num_kv_heads: 2 -> 1" in text and "WARNING" in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"seeds": 2, "variants": {"a": ["optim.lr=1"]}}, "no `baseline:`"),
        ({"baseline": "tiny", "seeds": 2, "variants": {"a": ["train.steps=5"]}},
         "variant 'a': may not override train.steps"),
        ({"baseline": "tiny", "seeds": 2, "variants": {"a": ["seed=3"]}}, "may not override seed"),
        ({"baseline": "tiny", "seeds": 2, "variants": {"a": {"train.seq_len": 64}}},
         "may not override train.seq_len"),
        ({"baseline": "tiny", "seeds": [1, 1], "variants": {"a": ["optim.lr=1"]}}, "repeat"),
        ({"baseline": "tiny", "variants": {"a": ["optim.lr=1"]}}, "`seeds:` is required"),
        ({"baseline": "tiny", "seeds": 1}, "`variants:`"),
        ({"baseline": {"config": "tiny", "overrides": ["seed=4"]}, "seeds": 1,
          "variants": {"a": ["optim.lr=1"]}}, "use `seeds:`"),
    ],
)  # fmt: skip
def test_bad_suites_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_suite(data, "bad.yaml")


def test_unknown_key_names_the_variant(tmp_path):
    s = _suite(tmp_path, {"baseline": "tiny", "seeds": 1,
                          "variants": {"typo": ["model.num_kv_head=1"]}})  # fmt: skip
    with pytest.raises(ConfigError, match="(?s)variant 'typo'.*Did you mean 'num_kv_heads'"):
        plan_arms(s)


@pytest.mark.parametrize("name", suite_names())
def test_example_suites_resolve(name):
    s = load_suite(name)
    arms = plan_arms(s)
    assert len(arms) >= 2 and len(s.seeds) >= 2
    assert all(a.changes for a in arms[1:])
    assert len({a.tokens for a in arms}) == 1
