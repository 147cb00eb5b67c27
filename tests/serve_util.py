"""Shared by the chat/serve tests: a run directory with a small model, and a live server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# A long context so a reply can run for hundreds of tokens (the disconnect test needs that).
CONTEXT = 1024


def train_chat_run(overrides: list[str], out_dir: Path) -> Path:
    """Two training steps of the small test model: a real run directory, quickly."""
    from crucible.config import load_config
    from crucible.train.trainer import train

    cfg = load_config(
        "tiny",
        [
            *overrides,
            f"out_dir={out_dir}",
            "name=chat-test",
            f"model.max_seq_len={CONTEXT}",
            "train.steps=2",
            "schedule.warmup_steps=1",
        ],
    )
    return train(cfg, quiet=True).run_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run a FastAPI app with uvicorn on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def chat_run(small_base: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with the small model and a 1,024-token context."""
    return train_chat_run(small_base, tmp_path_factory.mktemp("chat-run"))
