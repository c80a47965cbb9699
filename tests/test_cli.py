"""The `nas` command (`nas.__main__`): its subcommands, --help and --version, and the promise
that a command's --help loads neither torch nor optuna nor monai."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from nas.__main__ import COMMANDS, main

HEAVY = ("torch", "optuna", "monai")


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nas {version('nas')}"


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "export", "predict", "evaluate", "retrain", "report", "dashboard"):
        assert command in COMMANDS
        assert f"\n  {command} " in out


def test_a_command_gets_the_rest_of_the_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-params" in out and "--format" in out  # export's own options


def test_a_command_keeps_its_own_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "nas.export" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_help_of_every_command_loads_no_heavy_module():
    """In one fresh process: every command module imported and asked for --help, then the
    heavy modules that got loaded are listed (none may be)."""
    script = f"""
import contextlib, importlib, io, json, sys
for command in {list(COMMANDS)!r}:
    module = importlib.import_module("nas." + command)
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        module.parse_args(["--help"])
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    importlib.import_module("nas.__main__").main(["--help"])
import nas
print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_predict_engines_match_inference():
    from nas.inference import ENGINES
    from nas.predict import ENGINES as PREDICT_ENGINES

    assert PREDICT_ENGINES == ENGINES


def test_package_names_load_on_first_use():
    import nas

    assert nas.UNetConfig.__name__ == "UNetConfig"
    assert callable(nas.load) and callable(nas.build_unet)
    assert set(nas.__all__) <= set(dir(nas))
    with pytest.raises(AttributeError):
        nas.no_such_name  # noqa: B018
