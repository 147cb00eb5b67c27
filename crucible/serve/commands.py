"""`crucible chat RUN_DIR` (terminal) and `crucible serve RUN_DIR` (OpenAI-compatible HTTP + page)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crucible.argtypes import fraction, nonneg_float, nonneg_int, port, positive_int
from crucible.config import ConfigError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    p.add_argument("--checkpoint", default=None, help="step_N directory (default: latest)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    think = p.add_mutually_exclusive_group()
    think.add_argument(
        "--think", dest="thinking", action="store_true", default=True,
        help="reasoning mode by default (the default)",
    )  # fmt: skip
    think.add_argument(
        "--no-think", dest="thinking", action="store_false", help="no-think mode by default"
    )


def _engine(args: argparse.Namespace):
    from crucible.serve.engine import load_engine

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    return load_engine(run_dir, args.checkpoint, args.device)


def _cmd_chat(args: argparse.Namespace) -> int:
    from crucible.serve.engine import Sampling
    from crucible.serve.repl import run_repl

    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    engine = _engine(args)
    sampling = Sampling(args.temperature, args.top_p, args.top_k or None, args.seed)
    return run_repl(engine, sampling, args.max_new_tokens, args.system, args.thinking)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"`crucible serve` needs fastapi and uvicorn ({e.name} is missing): "
            "pip install 'crucible[serve]'"
        ) from e
    from crucible.serve.app import serve

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    engine = _engine(args)
    name = args.model_name or Path(args.run_dir).resolve().name
    serve(engine, name, args.host, args.port, args.thinking)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a run's model in the terminal (streaming, think toggle)",
        description="A terminal chat with a run directory's model; replies stream token by "
        "token. Type /think or /no_think to switch reasoning mode, /system TEXT to set the "
        "system prompt, /reset to start over, /exit to leave.",
    )
    _add_model_args(p)
    p.add_argument("--system", default="", help="initial system prompt")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=512, help="longest reply in tokens"
    )
    p.add_argument("--temperature", type=nonneg_float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling threshold")
    p.add_argument(
        "--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens (0: off)"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.set_defaults(func=_cmd_chat)

    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a web chat page",
        description="Serve a run directory's model: POST /v1/chat/completions (streaming as "
        "server-sent events), GET /v1/models, and a chat page at /. Requests take turns on "
        "one worker thread.",
    )
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument(
        "--model-name", default=None, help="the model id clients use (default: the run's name)"
    )
    p.set_defaults(func=_cmd_serve)
