"""`crucible merge`: inputs (runs, checkpoints, HF directories), outputs that generate / eval /
export read, the SmolLM3 recipe, bad input, and the eval-driven weight search."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml

from crucible.config import ConfigError, dump_config, load_config
from crucible.model import Transformer
from crucible.posttrain.merge_config import load_specs
from crucible.runs import load_run_model
from crucible.train.checkpoint import save_weights_checkpoint

SMALL_MODEL = ["model.vocab_size=512", "model.hidden_size=64", "model.num_layers=2",
               "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=128",
               "model.max_seq_len=64", "train.seq_len=64"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from crucible.data.corpora import iter_stdlib_documents
    from crucible.tokenizer.train import train_tokenizer

    texts = [d.text for d in iter_stdlib_documents("train", max_bytes=300_000)]
    return train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def make_run(root: Path, name: str, seed: int, tokenizer: Path, overrides=()) -> Path:
    """A run directory holding one checkpoint of a randomly initialised small model."""
    cfg = load_config("tiny", [*SMALL_MODEL, f"name={name}", *overrides])
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    shutil.copyfile(tokenizer, run / "tokenizer.json")
    save_weights_checkpoint(run / "checkpoints" / "step_000010", model.state_dict(), {"step": 10})
    return run


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_run_model(run)[0].state_dict()


def merge(*argv: str) -> None:
    from crucible.cli import main

    with pytest.raises(SystemExit) as e:
        main(["merge", *map(str, argv)])
    assert e.value.code == 0


def write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_smollm3_recipe_soup_then_linear(tmp_path, tokenizer):
    apo = [make_run(tmp_path, f"apo{i}", i, tokenizer) for i in range(3)]
    mid = make_run(tmp_path, "mid", 7, tokenizer)
    cfg = write(tmp_path / "recipe.yaml", [
        {"name": "soup", "merge_method": "model_soup", "models": [{"model": str(r)} for r in apo]},
        {"name": "final", "merge_method": "linear", "models": [
            {"model": "soup", "parameters": {"weight": 0.9}},
            {"model": str(mid), "parameters": {"weight": 0.1}}]},
    ])  # fmt: skip
    out = tmp_path / "merged"
    merge(cfg, "--out", out)
    got = weights(out)
    ws = [weights(r) for r in apo]
    wm = weights(mid)
    for name, t in got.items():
        soup = (ws[0][name] + ws[1][name] + ws[2][name]) / 3
        assert torch.allclose(t, 0.9 * soup + 0.1 * wm[name], atol=1e-6), name
    # what generate / eval / export read
    state = json.loads((out / "checkpoints" / "step_000000" / "state.json").read_text())
    assert [m["name"] for m in state["merge"]["merges"]] == ["soup", "final"]
    assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    from crucible.evaluate.load import load_eval_model

    lm, info = load_eval_model(out)
    assert info["kind"] == "crucible-run" and info["step"] == 0
    from crucible.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", str(out)])
    assert e.value.code == 0
    from crucible.model.hf import load_hf

    exported = load_hf(out / "hf").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in got.items())


def test_checkpoint_and_hf_inputs_and_hf_output(tmp_path, tokenizer):
    from crucible.model.hf import export_hf, load_hf

    a = make_run(tmp_path, "a", 0, tokenizer)
    b = make_run(tmp_path, "b", 1, tokenizer)
    hf_b = export_hf(load_run_model(b)[0], tmp_path / "b-hf", tokenizer_path=tokenizer)
    cfg = write(tmp_path / "slerp.yaml", [{
        "merge_method": "slerp", "base_model": str(a / "checkpoints" / "step_000010"),
        "models": [{"model": str(a / "checkpoints" / "step_000010")}, {"model": str(hf_b)}],
        "parameters": {"t": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]},
        "dtype": "bfloat16"}])  # fmt: skip
    out = tmp_path / "m"
    merge(cfg, "--out", out, "--hf")
    wa, wb = weights(a), weights(b)
    got = load_hf(out / "hf", dtype=None).state_dict()
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        want = wa[name] if "mlp" in name else wb[name]  # t = 0 keeps the base, t = 1 the other
        assert torch.allclose(t.float(), want, atol=1e-2, rtol=1e-2), name


def test_ties_and_dare_through_the_cli_are_seeded(tmp_path, tokenizer):
    runs = [make_run(tmp_path, n, i, tokenizer) for i, n in enumerate(["base", "x", "y"])]
    outs = []
    for seed in (0, 0, 1):
        cfg = write(tmp_path / "dare.yaml", [{
            "merge_method": "dare_ties", "base_model": str(runs[0]), "seed": seed,
            "models": [{"model": str(r), "parameters": {"weight": 0.5, "density": 0.5}}
                       for r in runs[1:]]}])  # fmt: skip
        out = tmp_path / f"d{len(outs)}"
        merge(cfg, "--out", out)
        outs.append(weights(out))
    name = "layers.0.mlp.up_proj.weight"
    assert torch.equal(outs[0][name], outs[1][name]) and not torch.equal(
        outs[0][name], outs[2][name]
    )


def _error(capsys, *argv) -> str:
    from crucible.cli import main

    with pytest.raises(SystemExit) as e:
        main(["merge", *map(str, argv)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crucible merge: error:") and "\n" not in err
    return err


def test_different_shapes_or_tokenizers_name_the_first_mismatch(tmp_path, tokenizer, capsys):
    a = make_run(tmp_path, "a", 0, tokenizer)
    wide = make_run(tmp_path, "wide", 1, tokenizer, ["model.intermediate_size=192"])
    cfg = write(tmp_path / "c.yaml", [{"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1}},
        {"model": str(wide), "parameters": {"weight": 1}}]}])  # fmt: skip
    err = _error(capsys, cfg, "--out", tmp_path / "o")
    assert "layers.0.mlp.gate_proj.weight" in err and "[128, 64] vs [192, 64]" in err
    theta = make_run(tmp_path, "theta", 1, tokenizer, ["model.rope_theta=500000"])
    cfg = write(tmp_path / "c.yaml", [{"merge_method": "model_soup", "models": [
        {"model": str(a)}, {"model": str(theta)}]}])  # fmt: skip
    assert "rope_theta 10000.0 vs 500000.0" in _error(capsys, cfg, "--out", tmp_path / "o")
    other = make_run(tmp_path, "other", 1, tokenizer)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    t300, t301 = (next(t for t, i in vocab.items() if i == k) for k in (300, 301))
    vocab[t300], vocab[t301] = 301, 300  # the same tokens, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = write(tmp_path / "c.yaml", [{"merge_method": "model_soup", "models": [
        {"model": str(a)}, {"model": str(other)}]}])  # fmt: skip
    err = _error(capsys, cfg, "--out", tmp_path / "o")
    assert "different tokenizers" in err and "token id 300" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "b"}]}, "parameters.t"),
        ({"merge_method": "ties", "models": [{"model": "a"}]}, "needs base_model"),
        ({"merge_method": "linear", "models": [{"model": "a"}]}, "needs a weight for model a"),
        ({"merge_method": "avg", "models": [{"model": "a"}]}, "merge_method"),
        ({"merge_method": "model_soup", "models": [{"model": "a"}], "normalise": 1}, "normalise"),
        ({"merge_method": "model_soup", "models": [{"model": "a", "parameters": {"weight": 2}}]},
         "takes no weight"),
    ],
)  # fmt: skip
def test_bad_configs_are_one_clear_line(tmp_path, capsys, doc, needle):
    err = _error(capsys, write(tmp_path / "bad.yaml", [doc]), "--out", tmp_path / "o")
    assert needle in err


def test_existing_output_is_kept(tmp_path, tokenizer, capsys):
    a = make_run(tmp_path, "a", 0, tokenizer)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = write(
        tmp_path / "c.yaml", [{"merge_method": "model_soup", "models": [{"model": str(a)}]}]
    )
    assert "--overwrite" in _error(capsys, cfg, "--out", out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="not a run directory"):
        from crucible.posttrain.merge_io import load_source

        load_source(str(tmp_path / "nothing"))


def test_weight_search_scores_each_point_and_keeps_the_best(tmp_path, tokenizer):
    a = make_run(tmp_path, "a", 0, tokenizer)
    b = make_run(tmp_path, "b", 1, tokenizer)
    cfg = write(tmp_path / "c.yaml", [{"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}},
        {"model": str(b), "parameters": {"weight": 0.5}}]}])  # fmt: skip
    out = tmp_path / "best"
    merge(cfg, "--out", out, "--search", "weight=0:1:0.5", "--task", "arithmetic", "--limit", "8")
    table = json.loads((tmp_path / "best-search" / "search.json").read_text())
    assert [r["weight"] for r in table["rows"]] == [0.0, 0.5, 1.0]
    assert (tmp_path / "best-search" / "search.png").stat().st_size > 0
    assert (
        "| weight | acc (arithmetic) | n |" in (tmp_path / "best-search" / "search.md").read_text()
    )
    best = table["best"]["weight"]
    got, wa, wb = weights(out), weights(a), weights(b)
    name = "embed.weight"
    assert torch.allclose(got[name], best * wa[name] + (1 - best) * wb[name], atol=1e-6)
    # the endpoints score exactly as the input models do
    from crucible.evaluate.load import load_eval_model
    from crucible.evaluate.suite import evaluate_tasks

    for x, run in ((1.0, a), (0.0, b)):
        lm, _ = load_eval_model(run)
        direct = evaluate_tasks(lm, ["arithmetic"], limit=8)["arithmetic"]["metrics"]["acc"]
        row = next(r for r in table["rows"] if r["weight"] == x)
        assert row["acc"] == pytest.approx(direct)


def test_shipped_smollm3_example_is_valid():
    path = resources.files("crucible.presets").joinpath("merges/smollm3.yaml")
    specs = load_specs(Path(str(path)))
    assert [s.merge_method for s in specs] == ["model_soup", "linear"]
    final = specs[-1]
    assert [e.parameters.weight for e in final.models] == [0.9, 0.1]
    assert final.models[0].model == specs[0].name


MK_CASES = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "m0", "parameters": {"weight": 0.7}}, {"model": "m1", "parameters": {"weight": 0.2}},
        {"model": "m2", "parameters": {"weight": 0.4}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "m0", "models": [
        {"model": "m1", "parameters": {"weight": 0.6}}, {"model": "m2", "parameters": {"weight": 0.3}}],
        "parameters": {"lambda": 0.9}},
    "ties": {"merge_method": "ties", "base_model": "m0", "models": [
        {"model": "m1", "parameters": {"weight": 0.6, "density": 0.4}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.7}}]},
    "slerp": {"merge_method": "slerp", "base_model": "m0", "models": [{"model": "m0"}, {"model": "m1"}],
        "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}]}},
}  # fmt: skip


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    from crucible.model.hf import export_hf

    root = tmp_path_factory.mktemp("hf-models")
    cfg = load_config("tiny", SMALL_MODEL)
    out = {}
    for i in range(3):
        torch.manual_seed(10 + i)
        out[f"m{i}"] = export_hf(Transformer(cfg.model), root / f"m{i}", tokenizer_path=tokenizer)
    return out


@pytest.mark.parametrize("case", sorted(MK_CASES))
def test_whole_model_merge_equals_mergekit(tmp_path, hf_models, case):
    """The same YAML through mergekit's own pipeline (run_merge) and through `crucible merge`."""
    pytest.importorskip("mergekit", reason="mergekit is a test-only reference (requirements.lock)")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from crucible.model.hf import load_hf

    text = json.dumps(MK_CASES[case])
    for name, path in hf_models.items():
        text = text.replace(f'"{name}"', json.dumps(str(path)))
    doc = {**json.loads(text), "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(doc), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False))  # fmt: skip
    merge(write(tmp_path / "c.yaml", [doc]), "--out", tmp_path / "ours")
    theirs = load_hf(tmp_path / "mk").state_dict()
    ours = weights(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6), (case, k)
