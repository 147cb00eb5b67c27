"""The command line: help on every command, parameter counts, clear errors."""

import pytest

from crucible.cli import build_parser, main

COMMANDS = [
    "train", "quickstart", "generate", "export", "report", "count-params", "config", "presets",
    "tokenizer", "data", "eval", "plan", "hardware", "roofline", "compass", "scaling", "bench",
    "doctor", "ablate",
]  # fmt: skip


def test_every_command_has_help(capsys):
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: crucible " + cmd in capsys.readouterr().out


def test_count_params_prints_published_total(capsys):
    with pytest.raises(SystemExit) as e:
        main(["count-params", "smollm3-3b"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "3,075,098,624 parameters" in out and "embedding" in out


def test_config_error_is_one_clear_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "tiny", "model.hidden_sise=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "model.hidden_sise: unknown key" in err and "hidden_size" in err
    assert "Traceback" not in err
