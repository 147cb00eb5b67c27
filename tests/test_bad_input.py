"""The bad-input battery: plausible user mistakes across every command group.

Each case asserts that the command exits 2, prints one line on stderr (a config validation error
may be the documented short block: a first line naming the file, then indented field lines) that
names the file, field or flag, prints no traceback, and leaves every file byte-identical (the shared
fixture tree and the working directory are hashed before and after). Adding a case is one line:

    (argv, substring the error must contain)

`{w}` in an argument is the fixture tree (a trained run, data, broken files; built once), `{t}` a
fresh empty directory per case (the working directory, so default outputs would land there).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import shutil
from pathlib import Path

import pytest

from crucible.cli import main

RUN = "{w}/run"
SMALL = [
    "model.vocab_size=512", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.intermediate_size=128", "model.max_seq_len=64",
    "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.val_batches=2", "train.tensorboard=false",
]  # fmt: skip
SHARDS = [
    "data.train_shards={w}/data/train", "data.val_shards={w}/data/val",
    "data.tokenizer={w}/run/tokenizer.json",
]  # fmt: skip
# A run config that would train the fixture's run again (resume cases change one thing).
RESUME = ["train", "--resume", "{w}/run/config.yaml"]

CASES: list[tuple[list[str], str]] = [
    # ---- config / count-params / presets
    (["config", "tiny", "model.hidden_sise=3"], "Did you mean 'hidden_size'"),
    (["config", "tinyy"], "tinyy: no such config file or preset"),
    (["config", "{w}/cfg/missing.yaml"], "missing.yaml: config file not found"),
    (["config", "{w}/cfg/self_base.yaml"], "self_base.yaml"),
    (["config", "{w}/cfg/loop_a.yaml"], "loop_a.yaml"),
    (["config", "{w}/cfg/empty.yaml"], "empty.yaml"),
    (["config", "{w}/cfg/list.yaml"], "expected a mapping"),
    (["config", "{w}/cfg/bad.yaml"], "bad.yaml:3: invalid YAML"),
    (["config", "{w}/cfg/bad_base.yaml"], "base"),
    (["config", "tiny", "optim.lr=-1"], "optim.lr"),
    (["config", "tiny", "optim.lr=abc"], "optim.lr"),
    (["config", "tiny", "optim.clip_grad=-1"], "optim.clip_grad"),
    (["config", "tiny", "optim.clip_grad=0"], "optim.clip_grad"),
    (["config", "tiny", "optim.betas=[0.9,1.5]"], "optim.betas"),
    (["config", "tiny", "optim.betas=[-0.1,0.9]"], "optim.betas"),
    (["config", "tiny", "optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["config", "tiny", "schedule.kind=cosin"], "schedule.kind"),
    (["config", "tiny", "schedule.warmup_steps=-1"], "schedule.warmup_steps"),
    (["config", "tiny", "schedule.decay_fraction=0"], "schedule.decay_fraction"),
    (["config", "tiny", "train.threads=-1"], "train.threads"),
    (["config", "tiny", "train.threads=0"], "train.threads"),
    (["config", "tiny", "train.steps=0"], "train.steps"),
    (["config", "tiny", "train.steps=1.5"], "train.steps"),
    (["config", "tiny", "train.seq_len=100000"], "train.seq_len"),
    (["config", "tiny", "train.global_batch_size=10", "train.micro_batch_size=4"], "micro_batch"),
    (["config", "tiny", "train.micro_batch_size=0"], "train.micro_batch_size"),
    (["config", "tiny", "train.dtype=fp16"], "train.dtype"),
    (["config", "tiny", "train.device=gpu"], "train.device"),
    (["config", "tiny", "train.stop_at=100000"], "train.stop_at"),
    (["config", "tiny", "train.log_every=0"], "train.log_every"),
    (["config", "tiny", "model.num_heads=3"], "num_heads"),
    (["config", "tiny", "model.num_kv_heads=3"], "num_kv_heads"),
    (["config", "tiny", "model.head_dim=33"], "head_dim"),
    (["config", "tiny", "model.vocab_size=1"], "model.vocab_size"),
    (["config", "tiny", "model.nope_layers=[99]"], "nope_layers"),
    (["config", "tiny", "model.norm_eps=0"], "model.norm_eps"),
    (["config", "tiny", "model.z_loss=-1"], "model.z_loss"),
    (["config", "tiny", "checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["config", "tiny", "checkpoint.milestone_every=7", "checkpoint.every=5"], "milestone_every"),
    (["config", "tiny", "data.corpus=wiki"], "data.corpus"),
    (["config", "tiny", "data.sources={a: x}"], "data.stages"),
    (["config", "tiny", "spikes.min_history=500"], "spikes.min_history"),
    (["config", "tiny", "spikes.policy=ignore"], "spikes.policy"),
    (["config", "tiny", "faults=[{step: 99999, kind: crash}]"], "faults"),
    (["config", "tiny", "distributed.strategy=zero"], "distributed.strategy"),
    (["config", "tiny", "eval.subset=0"], "eval.subset"),
    (["config", "tiny", "monitor.throughput_drop=2"], "monitor.throughput_drop"),
    (["config", "tiny", "lr=3e-4"], "Did you mean"),
    (["config", "tiny", "optim"], "expected key.path=value"),
    (["config", "tiny", "optim.lr.x=1"], "optim.lr"),
    (["count-params", "tinyy"], "tinyy"),
    (["count-params", "tiny", "model.num_layers=0"], "model.num_layers"),
    # ---- train (nothing may be written: the working directory must stay empty)
    (["train", "tiny", *SMALL, "train.device=cuda", "out_dir={t}/runs"], "train.device=cuda"),
    (["train", "tiny", *SMALL, "train.threads=-1", "out_dir={t}/runs"], "train.threads"),
    (
        [
            "train",
            "tiny",
            *SMALL,
            "data.train_shards={w}/nowhere",
            "data.val_shards={w}/data/val",
            "data.tokenizer={w}/run/tokenizer.json",
        ],
        "nowhere",
    ),
    (["train", "tiny", *SMALL, "data.tokenizer={w}/tok/notjson.json"], "notjson.json"),
    (["train", "tiny", *SMALL, *SHARDS[:2]], "data.tokenizer"),
    (["train", "tiny", *SMALL, *SHARDS[:2], "data.tokenizer={w}/tok/other.json"], "other.json"),
    (["train", "tiny", *SMALL, *SHARDS, "model.vocab_size=256"], "vocab_size"),
    (
        ["train", "tiny", *SMALL, *SHARDS, "schedule.min_lr=1", "out_dir={t}/runs"],
        "schedule.min_lr",
    ),
    (["train", "tiny", *SMALL, *SHARDS, "optim.clip_grad=-1", "out_dir={t}/runs"], "clip_grad"),
    (["train", "tiny", *SMALL, *SHARDS[1:], "data.train_shards={w}/other_tok"], "tokeniz"),
    (["train", "tiny", "--max-restarts", "-1", "--supervise"], "--max-restarts"),
    (["train", "tiny", "--backoff", "-1", "--supervise"], "--backoff"),
    (["train", "{w}/cfg/empty.yaml"], "empty.yaml"),
    (["train", RUN], "run"),
    (["train", "tiny", *SMALL, "name=run", "out_dir={w}"], "already exists"),
    (["train", "tiny", *SMALL, "out_dir={w}/cfg/empty.yaml/runs"], "not writable"),
    # ---- resume
    ([*RESUME, "train.steps=1"], "train.steps 1 is before"),
    ([*RESUME, "model.num_layers=3"], "model"),
    ([*RESUME, "seed=7"], "seed"),
    ([*RESUME, "train.seq_len=32"], "train.seq_len"),
    ([*RESUME, "train.global_batch_size=16"], "train.global_batch_size"),
    ([*RESUME, "train.stop_at=1"], "train.stop_at"),
    # ---- generate
    (["generate", RUN, "--top-p", "0"], "--top-p"),
    (["generate", RUN, "--top-p", "1.5"], "--top-p"),
    (["generate", RUN, "--top-k", "0"], "--top-k"),
    (["generate", RUN, "--top-k", "-3"], "--top-k"),
    (["generate", RUN, "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", RUN, "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", RUN, "--temperature", "-1"], "--temperature"),
    (["generate", RUN, "--temperature", "nan"], "--temperature"),
    (["generate", RUN, "--num-samples", "0"], "--num-samples"),
    (["generate", RUN, "--max-new-tokens", "ten"], "--max-new-tokens"),
    (["generate", "{w}/nowhere"], "nowhere"),
    (["generate", "{w}/cfg"], "cfg"),
    (["generate", RUN, "--checkpoint", "step_99"], "step_99"),
    (["generate", "{w}/norun"], "norun"),
    # ---- export
    (["export", RUN, "--out", RUN], "--out"),
    (["export", RUN, "--out", "{w}/run/checkpoints"], "--out"),
    (["export", RUN, "--out", "{w}/full"], "full"),
    (["export", RUN, "--out", "{w}/cfg/empty.yaml"], "empty.yaml"),
    (["export", RUN, "--out", "{w}/cfg/empty.yaml/hf"], "not writable"),
    (["export", RUN, "--checkpoint", "step_99"], "step_99"),
    (["export", "{w}/nowhere"], "nowhere"),
    # ---- report
    (["report", "{w}/nowhere"], "nowhere"),
    (["report", "{w}/cfg"], "metrics.jsonl"),
    (["report", "{w}/badmetrics"], "metrics.jsonl"),
    # ---- eval
    (["eval", RUN, "--tasks", "nosuchtask"], "nosuchtask"),
    (["eval", RUN, "--tasks", "arc_easy={w}/eval/broken.jsonl"], "broken.jsonl:2"),
    (["eval", RUN, "--tasks", "arc_easy={w}/eval/missing_fields.jsonl"], "missing_fields.jsonl"),
    (["eval", RUN, "--tasks", "arc_easy={w}/eval/none.jsonl"], "none.jsonl"),
    (["eval", RUN, "--limit", "0"], "--limit"),
    (["eval", RUN, "--batch-size", "0"], "--batch-size"),
    (["eval", RUN, "--fewshot", "-1"], "--fewshot"),
    (["eval", RUN, "--samples", "-2"], "--samples"),
    (["eval", RUN, "--checkpoint", "step_99"], "step_99"),
    (["eval", "{w}/nowhere"], "nowhere"),
    (["eval", "compare", "{w}/eval/a.json"], "compare"),
    (["eval", "compare", "{w}/eval/a.json", "{w}/eval/nothere.json"], "nothere.json"),
    (["eval", "compare", "{w}/eval/a.json", "{w}/eval/notjson.json"], "notjson.json"),
    (["eval", "audit"], "audit"),
    (["eval", "audit", "{w}/nowhere"], "nowhere"),
    (["eval", "longctx", RUN, "--lengths", "abc"], "--lengths"),
    (["eval", "longctx", RUN, "--lengths", "32", "--depths", "2"], "--depths"),
    (["eval", "longctx", RUN, "--trials", "0"], "--trials"),
    (["eval", "longctx", RUN, "--rope-scaling", "yarn"], "--rope-scaling"),
    (["eval", "longctx", RUN, "--lengths", "32", "--tasks", "nope"], "nope"),
    (["eval", "longctx", RUN, "--lengths", "256"], "--max-seq-len"),
    (["preflight", "tinyy"], "tinyy"),
    (["preflight", "tiny", "optim.clip_grad=0"], "optim.clip_grad"),
    # ---- tokenizer
    (["tokenizer", "train", "{w}/corpus/empty.txt", "--out", "{t}/tok"], "empty.txt"),
    (
        ["tokenizer", "train", "{w}/corpus/a.txt", "--out", "{t}/tok", "--min-frequency", "-1"],
        "--min-frequency",
    ),
    (
        ["tokenizer", "train", "{w}/corpus/a.txt", "--out", "{t}/tok", "--vocab-size", "10"],
        "vocab_size 10",
    ),
    (
        ["tokenizer", "train", "{w}/corpus/a.txt", "--out", "{t}/tok", "--vocab-size", "-5"],
        "--vocab-size",
    ),
    (
        ["tokenizer", "train", "{w}/corpus/a.txt", "--out", "{t}/tok", "--round-to", "0"],
        "--round-to",
    ),
    (["tokenizer", "train", "{w}/corpus/a.txt", "--out", "{t}/tok", "--max-mb", "-1"], "--max-mb"),
    (["tokenizer", "train", "{w}/corpus/nothere.txt", "--out", "{t}/tok"], "nothere.txt"),
    (["tokenizer", "train", "{w}/corpus/broken.jsonl", "--out", "{t}/tok"], "broken.jsonl:2"),
    (["tokenizer", "train", "{w}/corpus/a.txt", "--out", "{w}/cfg/empty.yaml/tok"], "not writable"),
    (
        ["tokenizer", "train", "{w}/corpus/a.txt", "--out", "{t}/tok", "--special-tokens", ""],
        "--special-tokens",
    ),
    (
        [
            "tokenizer",
            "eval",
            "{w}/tok/notjson.json",
            "--corpus",
            "en={w}/corpus/a.txt",
            "--out",
            "{t}/ev",
        ],
        "notjson.json",
    ),
    (
        [
            "tokenizer",
            "eval",
            "{w}/tok/other.json",
            "--corpus",
            "en={w}/corpus/a.txt",
            "--out",
            "{t}/ev",
        ],
        "other.json",
    ),
    (
        [
            "tokenizer",
            "eval",
            "{w}/run/tokenizer.json",
            "--corpus",
            "{w}/corpus/a.txt",
            "--out",
            "{t}/ev",
        ],
        "--corpus",
    ),
    (
        [
            "tokenizer",
            "eval",
            "{w}/run/tokenizer.json",
            "--corpus",
            "en={w}/corpus/nothere.txt",
            "--out",
            "{t}/ev",
        ],
        "nothere.txt",
    ),
    (
        [
            "tokenizer",
            "eval",
            "{w}/run/tokenizer.json",
            "--corpus",
            "en={w}/corpus/empty.txt",
            "--out",
            "{t}/ev",
        ],
        "empty.txt",
    ),
    (
        [
            "tokenizer",
            "eval",
            "{w}/run/tokenizer.json",
            "--corpus",
            "en={w}/corpus/a.txt",
            "--max-mb",
            "0",
            "--out",
            "{t}/ev",
        ],
        "--max-mb",
    ),
    # ---- data
    (["data", "process", "{w}/pipe/malformed.yaml"], "malformed.yaml"),
    (["data", "process", "{w}/pipe/notyaml.yaml"], "notyaml.yaml"),
    (["data", "process", "{w}/pipe/nothere.yaml"], "nothere.yaml"),
    (["data", "process", "{w}/pipe/over_input.yaml"], "output"),
    (["data", "process", "{w}/pipe/unknown_filter.yaml"], "gopher_qualty"),
    (["data", "process", "{w}/pipe/unknown_key.yaml"], "sourcez"),
    (["data", "process", "{w}/pipe/no_sources.yaml"], "sources"),
    (
        [
            "data",
            "tokenize",
            "{w}/corpus/nothere.jsonl",
            "--tokenizer",
            "{w}/run/tokenizer.json",
            "--out",
            "{t}/sh",
        ],
        "nothere.jsonl",
    ),
    (
        [
            "data",
            "tokenize",
            "{w}/corpus/docs.jsonl",
            "--tokenizer",
            "{w}/tok/notjson.json",
            "--out",
            "{t}/sh",
        ],
        "notjson.json",
    ),
    (
        [
            "data",
            "tokenize",
            "{w}/corpus/docs.jsonl",
            "--tokenizer",
            "{w}/run/tokenizer.json",
            "--out",
            "{t}/sh",
            "--workers",
            "0",
        ],
        "--workers",
    ),
    (
        [
            "data",
            "tokenize",
            "{w}/corpus/docs.jsonl",
            "--tokenizer",
            "{w}/run/tokenizer.json",
            "--out",
            "{t}/sh",
            "--shard-tokens",
            "0",
        ],
        "--shard-tokens",
    ),
    (
        [
            "data",
            "tokenize",
            "{w}/corpus/broken.jsonl",
            "--tokenizer",
            "{w}/run/tokenizer.json",
            "--out",
            "{t}/sh",
        ],
        "broken.jsonl:2",
    ),
    (
        [
            "data",
            "tokenize",
            "{w}/corpus/docs.jsonl",
            "--tokenizer",
            "{w}/run/tokenizer.json",
            "--out",
            "{w}/cfg/empty.yaml/sh",
        ],
        "not writable",
    ),
    (["data", "mixture", "{w}/mix/nothere.yaml"], "nothere.yaml"),
    (["data", "mixture", "{w}/mix/no_stages.yaml"], "no stages"),
    (["data", "mixture", "{w}/mix/missing_source.yaml"], "web"),
    (["data", "mixture", "{w}/mix/bad_tokens.yaml"], "tokens"),
    (["data", "mixture", "{w}/mix/neg_weight.yaml"], "weight"),
    (["data", "mixture", "{w}/mix/ok.yaml", "--max-epochs", "0"], "--max-epochs"),
    (["data", "mixture", "{w}/cfg/bad.yaml"], "bad.yaml"),
    # ---- plan / hardware / roofline / compass / scaling
    (["plan", "model", "tiny", "--price", "-2"], "--price"),
    (["plan", "model", "tiny", "--peak-tflops", "-5"], "--peak-tflops"),
    (["plan", "model", "tiny", "--mfu", "0"], "--mfu"),
    (["plan", "model", "tiny", "--mfu", "1.5"], "--mfu"),
    (["plan", "model", "tiny", "--gpus", "0"], "--gpus"),
    (["plan", "model", "tiny", "--gpus", "-8"], "--gpus"),
    (["plan", "model", "tiny", "--days", "-30"], "--days"),
    (["plan", "model", "tiny", "--tokens", "-1"], "--tokens"),
    (["plan", "model", "tiny", "--gpu", "h1000"], "h1000"),
    (["plan", "model", "tiny", "--gpus", "8", "--tp", "3"], "--gpus"),
    (["plan", "model", "tiny", "--tp", "0"], "--tp"),
    (["plan", "model", "tiny", "--micro-batch", "0"], "--micro-batch"),
    (["plan", "model", "tiny", "--seq-len", "-1"], "--seq-len"),
    (["plan", "model", "tiny", "--budget-gpu-hours", "-1"], "--budget-gpu-hours"),
    (["plan", "model", "tiny", "--budget-cost", "100"], "--price"),
    (["plan", "model", "tiny", "--memory-gib", "-80", "--peak-tflops", "100"], "--memory-gib"),
    (["plan", "model", "tiny", "--experts", "4", "--top-k", "8"], "top_k 8"),
    (["plan", "model", "tiny", "--top", "0", "--search"], "--top"),
    (["plan", "model", "tinyy"], "tinyy"),
    (["plan", "hardware", "h1000"], "h1000"),
    (["plan", "roofline", "tiny", "--gpu", "h1000"], "h1000"),
    (["plan", "roofline", "tiny", "--dtype", "int3"], "int3"),
    (["plan", "roofline", "tiny", "--micro-batch", "0"], "--micro-batch"),
    (["plan", "roofline", "tiny", "--decode-batch", "0"], "--decode-batch"),
    (["plan", "roofline", "tiny", "--peak-tflops", "-1"], "--peak-tflops"),
    (["plan", "compass", "--brief", "{w}/brief/neg_days.yaml"], "days"),
    (["plan", "compass", "--brief", "{w}/brief/unknown.yaml"], "budgett"),
    (["plan", "compass", "--brief", "{w}/brief/bad_target.yaml"], "target"),
    (["plan", "compass", "--brief", "{w}/brief/gpus_text.yaml"], "gpus"),
    (["plan", "compass", "--brief", "{w}/brief/nothere.yaml"], "nothere.yaml"),
    (["plan", "compass", "--brief", "{w}/cfg/bad.yaml"], "bad.yaml"),
    (["plan", "compass", "--brief", "{w}/brief/neg_days.yaml", "--out", "{t}/x.md"], "days"),
    (["plan", "scaling", "fit", RUN, RUN, RUN, RUN, RUN], "same run"),
    (["plan", "scaling", "fit", "{w}/nowhere"], "nowhere"),
    (["plan", "scaling", "fit", "{w}/cfg"], "summary.json"),
    (["hardware", "h1000"], "h1000"),  # the deprecated names fail the same way
    (["compass", "--brief", "{w}/brief/neg_days.yaml"], "days"),
    (["plan", "tiny", "--price", "-2"], "--price"),
    # ---- bench / doctor
    (["bench", "matmul", "--size", "0"], "--size"),
    (["bench", "matmul", "--dtypes", "fp7"], "fp7"),
    (["bench", "matmul", "--min-time", "-1"], "--min-time"),
    (["bench", "copy", "--bytes", "lots"], "--bytes"),
    (["bench", "storage", "{w}/nowhere"], "nowhere"),
    (["bench", "storage", "{w}/cfg/empty.yaml"], "empty.yaml"),
    (["bench", "storage", "{t}", "--size", "huge"], "--size"),
    (["bench", "loader", "{w}/nowhere"], "nowhere"),
    (["bench", "loader", "{w}/data/train", "--seq-len", "0"], "--seq-len"),
    (["bench", "loader", "{w}/data/train", "--batch", "0"], "--batch"),
    (["bench", "collectives", "--nproc", "0"], "--nproc"),
    (["bench", "collectives", "--ops", "allsum"], "allsum"),
    (["bench", "collectives", "--sizes", "x"], "--sizes"),
    (["doctor", "--threshold", "-1", "--no-measure"], "--threshold"),
    (["doctor", "--storage", "{w}/nowhere", "--no-measure"], "nowhere"),
    # ---- ablate
    (["ablate", "nosuchsuite"], "nosuchsuite"),
    (["ablate", "{w}/abl/malformed.yaml", "--dry-run"], "malformed.yaml"),
    (["ablate", "{w}/abl/unknown_key.yaml", "--dry-run"], "seedz"),
    (["ablate", "{w}/abl/bad_override.yaml", "--dry-run"], "hidden_sise"),
    (["ablate", "{w}/abl/ok.yaml", "--dry-run", "--jobs", "0"], "--jobs"),
    (["ablate", "{w}/abl/ok.yaml", "--dry-run", "--alpha", "2"], "--alpha"),
    # ---- post-training: chat-data, chat-inspect, merge, chat/serve argument checks
    (["chat-data", "{t}/cd", "--train", "-1"], "--train"),
    (["chat-data", "{t}/cd", "--test", "-1"], "--test"),
    (["chat-data", "{t}/cd", "--tasks", "nosuchtask"], "nosuchtask"),
    (["chat-data", "{w}/cfg/empty.yaml/cd"], "not writable"),
    (["chat-inspect", "{w}/nowhere.jsonl", "--tokenizer", "{w}/run/tokenizer.json"], "nowhere"),
    (
        ["chat-inspect", "{w}/chat/broken.jsonl", "--tokenizer", "{w}/run/tokenizer.json"],
        "broken.jsonl:2",
    ),
    (["chat-inspect", "{w}/chat/ok.jsonl", "--tokenizer", "{w}/tok/notjson.json"], "notjson.json"),
    (
        [
            "chat-inspect",
            "{w}/chat/ok.jsonl",
            "--tokenizer",
            "{w}/run/tokenizer.json",
            "--seq-len",
            "0",
        ],
        "--seq-len",
    ),
    (
        [
            "chat-inspect",
            "{w}/chat/ok.jsonl",
            "--tokenizer",
            "{w}/run/tokenizer.json",
            "--template",
            "{w}/nowhere.jinja",
        ],
        "nowhere.jinja",
    ),
    (["merge", "{w}/merge/nothere.yaml", "--out", "{t}/m"], "nothere.yaml"),
    (["merge", "{w}/merge/malformed.yaml", "--out", "{t}/m"], "malformed.yaml"),
    (["merge", "{w}/merge/unknown_method.yaml", "--out", "{t}/m"], "method"),
    (["merge", "{w}/merge/missing_model.yaml", "--out", "{t}/m"], "nowhere"),
    (["merge", "{w}/merge/ok.yaml", "--out", RUN], "--out"),
    (["merge", "{w}/merge/ok.yaml", "--out", RUN, "--overwrite"], "--out"),
    (["merge", "{w}/merge/ok.yaml", "--out", "{t}/m", "--limit", "0"], "--limit"),
    (["chat", "{w}/nowhere"], "nowhere"),
    (["chat", RUN, "--temperature", "-1"], "--temperature"),
    (["chat", RUN, "--top-p", "0"], "--top-p"),
    (["chat", RUN, "--max-new-tokens", "0"], "--max-new-tokens"),
    (["serve", "{w}/nowhere"], "nowhere"),
    (["serve", RUN, "--port", "70000"], "--port"),
    (["serve", RUN, "--port", "-1"], "--port"),
    (["serve", RUN, "--checkpoint", "step_99"], "step_99"),
]

# Legal but surprising: the command goes on (exit 0) after one warning line.
WARN_CASES: list[tuple[list[str], str]] = [
    (["config", "tiny", "data.train_shards={w}/data/train", "data.val_shards={w}/data/train",
      "data.tokenizer={w}/run/tokenizer.json"], "warning: data.val_shards is data.train_shards"),
]  # fmt: skip

# ------------------------------------------------------------------ the fixture tree

ARC = {
    "id": "q1",
    "question": "Which is a metal?",
    "choices": {"text": ["copper", "wood"], "label": ["A", "B"]},
    "answerKey": "A",
}
FILES: dict[str, str] = {
    "cfg/self_base.yaml": "base: self_base.yaml\ntrain: {steps: 3}\n",
    "cfg/loop_a.yaml": "base: loop_b.yaml\n",
    "cfg/loop_b.yaml": "base: loop_a.yaml\n",
    "cfg/empty.yaml": "",
    "cfg/list.yaml": "- a\n- b\n",
    "cfg/bad.yaml": "name: x\nmodel: {hidden_size: [\n",
    "cfg/bad_base.yaml": "base: 42\n",
    "tok/notjson.json": "this is not JSON\n",
    "tok/other.json": '{"vocab": {"a": 0}, "merges": []}\n',
    "corpus/empty.txt": "",
    "corpus/a.txt": "the quick brown fox jumps over the lazy dog. " * 200,
    "corpus/broken.jsonl": '{"text": "fine"}\n{"text": "broken\n',
    "corpus/docs.jsonl": '{"text": "hello world, a document."}\n' * 20,
    "eval/broken.jsonl": __import__("json").dumps(ARC) + "\n{broken\n",
    "eval/missing_fields.jsonl": '{"id": "q1", "question": "no choices"}\n',
    "eval/none.jsonl": "",
    "eval/a.json": '{"model": "a", "tasks": {}}\n',
    "eval/notjson.json": "not json\n",
    "badmetrics/metrics.jsonl": '{not json\n{"event": "train", "step": 1}\n',
    "pipe/malformed.yaml": "sources: [\n",
    "pipe/notyaml.yaml": "- just\n- a list\n",
    "pipe/over_input.yaml": "sources:\n  - {name: docs, kind: jsonl, paths: [in/*.jsonl]}\n"
    "steps: []\noutput: in\n",
    "pipe/in/docs.jsonl": '{"text": "a document that must survive."}\n',
    "pipe/unknown_filter.yaml": "sources:\n  - {name: d, kind: jsonl, paths: [in/*.jsonl]}\n"
    "steps:\n  - gopher_qualty: {}\noutput: out\n",
    "pipe/unknown_key.yaml": "sourcez: []\noutput: out\n",
    "pipe/no_sources.yaml": "steps: []\noutput: out\n",
    "mix/no_stages.yaml": "available: {web: 1e9}\n",
    "mix/missing_source.yaml": "available: {code: 1e9}\n"
    "stages:\n  - {name: s, tokens: 1e9, weights: {web: 1.0}}\n",
    "mix/bad_tokens.yaml": "available: {web: 1e9}\nstages:\n  - {name: s, tokens: lots, weights: {web: 1}}\n",
    "mix/neg_weight.yaml": "available: {web: 1e9}\nstages:\n  - {name: s, tokens: 1e9, weights: {web: -1}}\n",
    "mix/ok.yaml": "available: {web: 1e9}\nstages:\n  - {name: s, tokens: 1e9, weights: {web: 1}}\n",
    "brief/neg_days.yaml": "days: -30\n",
    "brief/unknown.yaml": "budgett: 3\n",
    "brief/bad_target.yaml": "target: toaster\n",
    "brief/gpus_text.yaml": "gpus: many\n",
    "abl/malformed.yaml": "name: [\n",
    "abl/unknown_key.yaml": "name: x\nseedz: 2\nbaseline: {config: tiny}\nvariants: {a: {}}\n",
    "abl/bad_override.yaml": "name: x\nseeds: 1\nbaseline: {config: tiny, overrides: "
    "{model.hidden_sise: 3}}\nvariants: {a: [optim.lr=1e-3]}\n",
    "abl/ok.yaml": "name: x\nseeds: 1\nbaseline: {config: tiny}\nvariants: {a: {}}\n",
    "chat/broken.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n',
    "chat/ok.jsonl": '{"messages": [{"role": "user", "content": "hi"}, '
    '{"role": "assistant", "content": "hello"}]}\n',
    "merge/malformed.yaml": "merge_method: [\n",
    "merge/unknown_method.yaml": "merge_method: average\nmodels:\n  - model: ../run\n",
    "merge/missing_model.yaml": "merge_method: linear\nmodels:\n  - model: ../nowhere\n"
    "    parameters: {weight: 1}\n",
    "merge/ok.yaml": "merge_method: linear\nmodels:\n  - model: ../run\n    parameters: {weight: 1}\n",
    "full/keep.txt": "somebody's file\n",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_base: list[str], small_data: Path) -> Path:
    """A trained two-step run plus every broken file the cases name; built once."""
    w = tmp_path_factory.mktemp("world")
    build_world(w, small_base, small_data)
    return w


def build_world(w: Path, small_base: list[str], small_data: Path) -> None:
    from crucible.config import load_config
    from crucible.pretrain import run_pretraining

    cfg = load_config(
        "tiny",
        [*small_base, "name=run", f"out_dir={w}", "train.steps=2", "train.val_every=0",
         "checkpoint.every=0", "schedule.warmup_steps=1", "eval.at_end=false"],
    )  # fmt: skip
    run_pretraining(cfg, quiet=True)
    for rel, text in FILES.items():
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(text)
    shutil.copytree(small_data / "train", w / "data" / "train")
    shutil.copytree(small_data / "val", w / "data" / "val")
    _other_tokenizer(small_data / "train", w / "other_tok")
    _u32_without_metadata(small_data / "train", w / "u32")


def _u32_without_metadata(src: Path, dst: Path) -> None:
    """Shards whose token ids were stored as uint32 but whose metadata was lost."""
    import numpy as np

    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.suffix == ".ds":
            (dst / f.name).write_bytes(np.fromfile(f, dtype=np.uint16).astype(np.uint32).tobytes())
        elif f.name.endswith(".index"):
            (dst / f.name).write_bytes(f.read_bytes())


def _other_tokenizer(src: Path, dst: Path) -> None:
    """Shards whose dataset.json says another tokenizer (a different vocabulary) made them."""
    import json

    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    meta["vocab_size"] = meta["vocab_size"] * 2
    (dst / "dataset.json").write_text(json.dumps(meta))


def _snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _error_lines(err: str) -> list[str]:
    """The error's lines: one, or the config block (a first line, then indented field lines)."""
    lines = [
        ln for ln in err.splitlines() if ln.strip() and not re.search(r": (warning|note): ", ln)
    ]
    if len(lines) > 1 and "invalid configuration" in lines[0]:
        assert all(ln.startswith("  ") for ln in lines[1:]), err
        return lines[:1]
    if len(lines) > 1 and lines[0].endswith("error: no usable SFT examples:"):
        return lines[:1]  # chat-inspect's documented report: the problems per file follow
    return lines


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[" ".join(c[0])[:80] for c in CASES])
def test_bad_input(argv, needle, world: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{w}", str(world)).replace("{t}", str(tmp_path)) for a in argv]
    before = _snapshot(world, tmp_path)
    code, _, err = _run(args)
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert needle in err, err
    assert _snapshot(world, tmp_path) == before, "files changed"


@pytest.mark.parametrize(("argv", "needle"), WARN_CASES)
def test_surprising_value_warns(argv, needle, world: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _run([a.replace("{w}", str(world)) for a in argv])
    assert code == 0 and needle in err, err


def test_failed_quickstart_rerun_restores_the_previous_run(tmp_path: Path) -> None:
    """A rerun replaces the quickstart's run only once the new one has trained."""
    from crucible.quickstart import MARKER, quickstart

    run = tmp_path / "quickstart"
    (run / "checkpoints").mkdir(parents=True)
    (run / MARKER).write_text("made by crucible quickstart\n")
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    (tmp_path / "bad.json").write_text("not a tokenizer\n")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="bad.json"):  # fails in the trainer's checks
        quickstart([f"data.tokenizer={tmp_path / 'bad.json'}"], out_dir=str(tmp_path))
    assert _snapshot(tmp_path) == before


def test_compass_with_stdin_closed_is_one_clear_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = _run(["plan", "compass"])
    assert code == 2 and "--brief" in err and len(_error_lines(err)) == 1, err


def test_documented_mixture_example_runs(tmp_path: Path) -> None:
    """docs/data.md's `data mixture` example, as written (5.1e12 is a string to YAML 1.1)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "available:" in b)
    plan = tmp_path / "mixture.yaml"
    plan.write_text(block)
    code, out, err = _run(["data", "mixture", str(plan)])
    assert code == 0, err
    assert "4.44" in out  # the doc: math at 3% of 8T over 54B is 4.44 epochs


def test_uint32_shards_without_metadata_are_read_as_uint32(world: Path) -> None:
    from crucible.data.shards import ShardSet

    ref, u32 = ShardSet(world / "data" / "train"), ShardSet(world / "u32")
    assert u32.dtype.itemsize == 4 and u32.num_tokens == ref.num_tokens


def test_battery_size() -> None:
    assert len(CASES) >= 150
