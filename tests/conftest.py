"""Test environment: offline, deterministic, and a small shared dataset built once per session."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="crucible-hf-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# A model and data small enough that a training run takes a few seconds on 2 cores.
SMALL_MODEL = [
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.max_seq_len=64",
    "train.seq_len=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.val_batches=2",
    "train.tensorboard=false",
    "data.max_corpus_mb=0.6",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Tokenizer + shards for SMALL_MODEL, built once and reused by every training test."""
    from crucible.config import load_config
    from crucible.data.prepare import prepare_data

    cache = tmp_path_factory.mktemp("data-cache")
    cfg = load_config("tiny", [*SMALL_MODEL, f"data.cache_dir={cache}"])
    prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
    return cache


@pytest.fixture(scope="session")
def small_data(data_cache: Path) -> Path:
    """The directory of SMALL_MODEL's built data (tokenizer.json, train/, val/): other tests
    build other datasets in the same cache, so find this one by its configuration."""
    from crucible.config import load_config
    from crucible.data.prepare import prepare_data

    cfg = load_config("tiny", [*SMALL_MODEL, f"data.cache_dir={data_cache}"])
    return prepare_data(
        cfg.data, cfg.model.vocab_size, cfg.train.seq_len, quiet=True
    ).val_dir.parent


@pytest.fixture(scope="session")
def small_base(data_cache: Path) -> list[str]:
    """Overrides for a small model on the shared data, without an output directory."""
    return [*SMALL_MODEL, f"data.cache_dir={data_cache}"]


@pytest.fixture
def small_overrides(small_base: list[str], tmp_path: Path) -> list[str]:
    return [*small_base, f"out_dir={tmp_path / 'runs'}"]
