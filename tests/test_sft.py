"""`crucible sft`: SFT on the training loop (base init, objective, validation, resume, reports)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from crucible.config import ConfigError, load_config
from crucible.posttrain.chat_template import ChatEncoder, ChatTemplate
from crucible.posttrain.conversations import parse_record
from crucible.posttrain.sft_data import SFTLoader
from crucible.posttrain.sft_loss import sft_loss
from crucible.posttrain.sft_run import (
    load_sft_config,
    make_train_inputs,
    prepare_sft_inputs,
    resolve_base,
    run_sft,
)
from crucible.train.trainer import train

SEQ = 96


def _record(i: int, pad: int = 0) -> dict:
    a, b = 3 + i % 40, 5 + (7 * i) % 30
    think = i % 2 == 0
    answer = {"role": "assistant", "content": f"The answer is {a + b}." + " ok" * pad}
    if think:
        answer["reasoning_content"] = f"{a} + {b} = {a + b}."
    return {
        "messages": [
            {"role": "system", "content": "/system_override Be brief."},
            {"role": "user", "content": f"What is {a} + {b}?"},
            answer,
        ],
        "chat_template_kwargs": {"enable_thinking": think},
    }


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("chat")
    train, val = d / "train.jsonl", d / "val.jsonl"
    rows = [_record(i) for i in range(60)] + [_record(1000, pad=200)]  # one too long
    train.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"messages": []}\n')
    val.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(500, 516)))
    return train, val


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small_base) -> Path:
    """A small pretrained run to fine-tune (a few steps of the conftest model)."""
    out = tmp_path_factory.mktemp("base-runs")
    cfg = load_config("tiny", [*small_base, f"out_dir={out}", "name=base", "train.steps=3",
                               "train.val_every=0", "checkpoint.every=0"])  # fmt: skip
    train(cfg, quiet=True)
    return cfg.run_dir


def _sft_config(path: Path, base: Path | None, train_f: Path, val_f: Path, **train_kw) -> Path:
    cfg = {
        "name": "sft",
        "out_dir": str(path / "runs"),
        "sft": {"base": str(base) if base else None, "train_data": [str(train_f)],
                "val_data": [str(val_f)]},
        "train": {"steps": 4, "seq_len": SEQ, "global_batch_size": 4, "micro_batch_size": 2,
                  "val_every": 2, "log_every": 1, "val_batches": 2, "tensorboard": False,
                  "dtype": "fp32", **train_kw},
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every": 2},
        "spikes": {"policy": "none"},
    }  # fmt: skip
    f = path / "sft.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_run_from_a_base_run(tmp_path, base_run, chat_files):
    cfg = load_sft_config(_sft_config(tmp_path, base_run, *chat_files))
    base_model = load_config(base_run / "config.yaml").model
    # the base's shape; context raised to train.seq_len; doc masking on for packing
    assert cfg.model.hidden_size == base_model.hidden_size
    assert cfg.model.max_seq_len == SEQ and cfg.model.doc_masking
    inputs = prepare_sft_inputs(cfg)
    assert inputs.train_stats.too_long == 1 and len(inputs.train) == 60
    # the model starts from the base checkpoint's weights
    from crucible.model import Transformer

    fresh = Transformer(cfg.model)
    make_train_inputs(cfg, inputs).init_model(fresh)
    saved = load_file(str(resolve_base(str(base_run)).checkpoint / "model.safetensors"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())

    result = run_sft(cfg, quiet=True)
    run = cfg.run_dir
    assert (run / "chat_template.jinja").read_text() == ChatTemplate.default().source
    assert (run / "tokenizer.json").read_bytes() == (base_run / "tokenizer.json").read_bytes()
    events = _events(run)
    data = next(e for e in events if e["event"] == "sft_data")
    assert data["examples"] == 60 and data["dropped_too_long"] == 1
    assert data["broken_records"] == 1 and data["left_out"] == 0
    assert 0 < data["supervised_share"] < 1 and data["packing"] is True
    train_ev = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train_ev] == [1, 2, 3, 4]
    assert all(0 < e["supervised_share"] < 1 for e in train_ev)
    val = [e for e in events if e["event"] == "val"]
    assert [e["step"] for e in val] == [2, 4] and val[-1]["val_loss"] < val[0]["val_loss"] + 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(result.val["val_loss"])


def test_validation_loss_is_the_sft_loss_on_the_val_split(tmp_path, base_run, chat_files):
    cfg = load_sft_config(_sft_config(tmp_path, base_run, *chat_files, steps=1, val_every=0))
    result = run_sft(cfg, quiet=True)
    inputs = prepare_sft_inputs(cfg)
    from crucible.runs import load_run_model

    model, _, _ = load_run_model(cfg.run_dir)
    batches = make_train_inputs(cfg, inputs).val_batches(0, 1)
    total = n = 0.0
    with torch.no_grad():
        for b in batches:
            k = b.num_supervised
            total += float(sft_loss(model, b)) * k
            n += k
    assert result.val["val_loss"] == pytest.approx(total / n, rel=1e-5)
    assert result.val["val_tokens"] == n


def test_micro_batches_do_not_change_the_update(tmp_path, chat_files, small_data):
    """grad accumulation: one step as 1 x 4 rows or 2 x 2 rows gives the same weights."""
    tok = small_data / "tokenizer.json"
    weights = []
    for micro in (4, 2):
        d = tmp_path / f"m{micro}"
        d.mkdir()
        f = _sft_config(d, None, *chat_files, steps=1, micro_batch_size=micro, val_every=0)
        model = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=1",
                 "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=64"]  # fmt: skip
        cfg = load_sft_config(f, [f"data.tokenizer={tok}", *model])
        run_sft(cfg, quiet=True)
        weights.append(load_file(str(cfg.run_dir / "checkpoints/step_000001/model.safetensors")))
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6)


def test_objective_normaliser_weighs_every_supervised_token_equally(small_data, chat_files):
    from crucible.model import Transformer

    tok = ChatEncoder(ChatTemplate.default(), __import__("tokenizers").Tokenizer.from_file(
        str(small_data / "tokenizer.json")))  # fmt: skip
    from crucible.posttrain.sft_data import tokenize_conversations

    convs = [parse_record(_record(i)) for i in range(8)]
    examples, _ = tokenize_conversations(convs, tok, max_tokens=SEQ + 1)
    cfg = load_config(None, ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=1",
                             "model.num_heads=2", "model.num_kv_heads=2",
                             "model.intermediate_size=64", f"model.max_seq_len={SEQ}", f"train.seq_len={SEQ}",
                             "model.doc_masking=true"]).model  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    split = SFTLoader(examples, SEQ, 8, 2, pad_id=0, packing=False).step_batches(0)
    whole = SFTLoader(examples, SEQ, 8, 8, pad_id=0, packing=False).step_batches(0)[0]
    with torch.no_grad():
        parts = sum(float(sft_loss(model, b, normalizer=b.step_supervised)) for b in split)
        assert parts == pytest.approx(float(sft_loss(model, whole)), rel=1e-5)


def test_config_errors(tmp_path, base_run, chat_files, capsys):
    f = _sft_config(tmp_path, base_run, *chat_files)
    with pytest.raises(ConfigError, match="another shape.*hidden_size"):
        load_sft_config(f, ["model.hidden_size=32"])
    with pytest.raises(ConfigError, match="doc_masking"):
        load_sft_config(f, ["model.doc_masking=false"])
    load_sft_config(f, ["model.doc_masking=false", "sft.packing=none"])  # fine unpacked
    with pytest.raises(ConfigError, match="sft.base .*no such directory"):
        load_sft_config(f, [f"sft.base={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="sft.bogus: unknown key.*Allowed: base"):
        load_sft_config(f, ["sft.bogus=1"])
    with pytest.raises(ConfigError, match="sft.loss"):
        load_sft_config(f, ["sft.loss=everything"])
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: x\n")
    with pytest.raises(ConfigError, match="needs an `sft:` section"):
        load_sft_config(plain)
    cfg = load_sft_config(f, [f"sft.train_data=[{tmp_path / 'missing.jsonl'}]"])
    with pytest.raises(ConfigError, match="sft.train_data"):
        prepare_sft_inputs(cfg)
    # `crucible train` refuses an SFT config; `crucible sft` errors are one line, exit 2
    from crucible.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", str(f)])
    assert exit_.value.code == 2 and "crucible sft" in capsys.readouterr().err


def test_sft_from_a_hugging_face_directory(tmp_path, base_run, chat_files):
    from crucible.model import export_hf
    from crucible.runs import load_run_model

    model, _, _ = load_run_model(base_run)
    hf = export_hf(model, tmp_path / "hf", tokenizer_path=str(base_run / "tokenizer.json"))
    cfg = load_sft_config(_sft_config(tmp_path, hf, *chat_files, steps=1, val_every=0))
    base = resolve_base(str(hf))
    assert base.kind == "hf" and cfg.model.hidden_size == model.cfg.hidden_size
    from crucible.model import Transformer

    fresh = Transformer(cfg.model)
    base.load_into(fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    run_sft(cfg, quiet=True)
    assert (cfg.run_dir / "summary.json").is_file()


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "crucible", *args], capture_output=True,
                          text=True, **kw)  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, base_run, chat_files):
    f = _sft_config(tmp_path, base_run, *chat_files, steps=8, val_every=3)
    ref = _cli(["sft", str(f), "name=reference", "checkpoint.every=3"])
    assert ref.returncode == 0, ref.stderr
    # the kill is deterministic (after step 5, between checkpoints) rather than timed: a timed
    # kill raced the end of this short run on a fast machine
    chaos = tmp_path / "chaos"
    chaos.write_text("step@5")
    env = {**os.environ, "CRUCIBLE_CHAOS_FILE": str(chaos)}
    killed = _cli(["sft", str(f), "name=killed", "checkpoint.every=3"], env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "summary.json").exists()
    resumed = _cli(["sft", str(f), "name=killed", "checkpoint.every=3", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    a = load_file(str(tmp_path / "runs/reference/checkpoints/step_000008/model.safetensors"))
    b = load_file(str(run_dir / "checkpoints/step_000008/model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [e["step"] for e in _events(run_dir) if e["event"] == "train"]
    assert steps == list(range(1, 9))
    # a changed SFT section is refused on resume
    bad = _cli(["sft", str(f), "name=killed", "sft.loss=completion", "--resume"])
    assert bad.returncode == 2 and "sft" in bad.stderr


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process(tmp_path, base_run, chat_files):
    f = _sft_config(tmp_path, base_run, *chat_files, steps=2, val_every=0)
    one = _cli(["sft", str(f), "name=one", "train.threads=1"])
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "crucible", "sft", str(f), "name=two", "train.threads=1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(str(tmp_path / "runs/one/checkpoints/step_000002/model.safetensors"))
    b = load_file(str(tmp_path / "runs/two/checkpoints/step_000002/model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_quickstart_chat_runs_base_sft_and_demo(tmp_path, data_cache, capsys):
    from crucible.quickstart import quickstart

    base = ["train.steps=4", "train.val_every=0", "checkpoint.every=0", "eval.every=0",
            "data.max_corpus_mb=1", f"data.cache_dir={data_cache}", "train.tensorboard=false",
            "model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128",
            "model.num_heads=2", "model.num_kv_heads=2"]  # fmt: skip
    sft = ["train.steps=2", "train.val_every=0", "sft.synthetic_train=24",
           "sft.synthetic_val=4", "train.tensorboard=false"]  # fmt: skip
    chat_dir = quickstart(base, out_dir=str(tmp_path), chat=True, chat_overrides=sft)
    assert chat_dir == tmp_path / "quickstart-chat"
    assert (chat_dir / "chat_template.jinja").is_file() and (chat_dir / "summary.json").is_file()
    out = capsys.readouterr().out
    assert "chat demo" in out and out.count("user") >= 4
    # a rerun replaces both demo runs; a directory the quickstart did not make is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not made by the quickstart"):
        from crucible.quickstart import _check_replaceable

        _check_replaceable(tmp_path / "mine")
