"""The command line: help on every command, parameter counts, clear errors."""

import pytest

from crucible.cli import build_parser, main, rewrite_argv, subcommands


def test_every_command_has_help_with_an_example(capsys):
    """Walk the whole command tree: each command's --help prints its usage and one example."""
    paths = [path for path, _ in subcommands(build_parser())]
    assert {"train", "plan model", "plan hardware", "eval-compare", "completion"} <= set(paths)
    for path in paths:
        argv = rewrite_argv(path.replace("eval-", "eval ").split())
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*argv, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: crucible "), path
        assert "Example: crucible " in out, f"`crucible {path} --help` shows no example"


def test_old_planning_names_are_deprecated_aliases(capsys):
    with pytest.raises(SystemExit) as e:
        main(["hardware", "h100"])
    assert e.value.code == 0
    captured = capsys.readouterr()
    assert "H100 SXM" in captured.out
    assert "`crucible hardware` is deprecated" in captured.err
    assert "crucible plan hardware" in captured.err
    with pytest.raises(SystemExit):
        main(["plan", "tiny", "--gpus", "1"])
    captured = capsys.readouterr()
    assert "# Plan: tiny" in captured.out and "use `crucible plan model`" in captured.err


def test_json_path_means_the_same_everywhere(tmp_path, capsys):
    """--json PATH writes the results as JSON to PATH; `-` prints them instead."""
    import json

    out = tmp_path / "hw.json"
    with pytest.raises(SystemExit):
        main(["plan", "hardware", "h100", "--json", str(out)])
    assert json.loads(out.read_text())[0]["name"] == "H100 SXM"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["plan", "hardware", "h100", "--json", "-"])
    assert json.loads(capsys.readouterr().out)[0]["name"] == "H100 SXM"
    for path, parser in subcommands(build_parser()):
        for action in parser._actions:
            if "--json" in action.option_strings:
                assert action.metavar == "PATH" and action.nargs is None, path


def test_bash_completion_completes_commands_and_options(tmp_path, capsys):
    import shutil
    import subprocess

    with pytest.raises(SystemExit):
        main(["completion", "bash"])
    script = tmp_path / "crucible.bash"
    script.write_text(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["completion", "zsh"])
    assert "compdef _crucible crucible" in capsys.readouterr().out
    if shutil.which("bash") is None:
        return
    probe = (
        f'source {script}; t() {{ COMP_WORDS=("$@"); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); '
        '_crucible; echo "${COMPREPLY[*]}"; }; t crucible pl; t crucible plan ""; '
        "t crucible generate run --top; t crucible eval co"
    )
    lines = subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout
    assert lines.splitlines() == [
        "plan", "model hardware roofline compass scaling", "--top-k --top-p", "compare"
    ]  # fmt: skip


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
