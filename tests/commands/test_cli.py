"""The `nas` command (`nas.__main__`): its subcommands, --help and --version, the promise
that a command's --help loads neither torch nor optuna nor monai, and that bad input is
reported without loading torch."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest

from nas.__main__ import COMMANDS, main
from nas.commands.cli import command_module
from tests import datasets
from tests.conftest import tiny_space_yaml

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
    every = ("run", "export", "predict", "evaluate", "retrain", "report", "dashboard")
    for command in (*every, "storage-proxy"):
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
    # Two lines, not argparse's usage block: what is wrong, and where the options are.
    assert capsys.readouterr().err.splitlines() == [
        "nas export: error: the following arguments are required: results",
        "see nas export --help for the options",
    ]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_every_command_says_what_it_is(command):
    parser = importlib.import_module(command_module(command)).make_parser()
    assert parser.format_usage().startswith(f"usage: nas {command} ")
    for action in parser._actions:  # argparse keeps no public list of them
        if action.help == argparse.SUPPRESS:  # internal (nas run --worker-index)
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"nas {command} {name} has no help"


def test_usage_names_the_command_as_it_was_typed():
    commands = {
        "nas run --help": [sys.executable, "-m", "nas", "run", "--help"],
        "python -m nas.run --help": [sys.executable, "-m", "nas.run", "--help"],
    }
    usages = {
        typed: subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for typed, argv in commands.items()
    }
    assert usages["nas run --help"].startswith("usage: nas run ")
    assert usages["python -m nas.run --help"].startswith("usage: python -m nas.run ")


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
from nas.commands.cli import command_module
for command in {list(COMMANDS)!r}:
    module = importlib.import_module(command_module(command))
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


def test_predict_engines_and_overlap_match_inference():
    from nas.deploy.predict import DEFAULT_OVERLAP as PREDICT_OVERLAP
    from nas.deploy.predict import ENGINES as PREDICT_ENGINES
    from nas.network.inference import ENGINES
    from nas.network.windows import DEFAULT_OVERLAP

    assert PREDICT_ENGINES == ENGINES
    assert PREDICT_OVERLAP == DEFAULT_OVERLAP


def test_package_names_load_on_first_use():
    import nas

    assert nas.UNetConfig.__name__ == "UNetConfig"
    assert callable(nas.load) and callable(nas.build_unet)
    assert set(nas.__all__) <= set(dir(nas))
    with pytest.raises(AttributeError):
        nas.no_such_name  # noqa: B018


# Refuses torch in a fresh process: an error path that reaches for it ends in ImportError.
WITHOUT_TORCH = """
import contextlib, io, json, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} was imported")

sys.meta_path.insert(0, NoTorch())
from nas.__main__ import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
        except ImportError as error:
            code = repr(error)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_bad_input_is_reported_before_torch_loads(tmp_path, tiny_dataset):
    """Each command's answer to a mistake (space, settings, data, test split, results folder,
    trial, model folder, masks) comes from a process in which importing torch fails: the
    one-line error is there before the seconds torch takes to load."""
    import optuna

    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    (tmp_path / "bad.yaml").write_text("search: [\n")
    corrupt = datasets.write_nnunet(tmp_path / "corrupt", 4)
    truncated = corrupt / "imagesTr" / "case_001_0000.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:200])
    unlabelled = datasets.write_nnunet(tmp_path / "unlabelled", 4)
    (unlabelled / "imagesTs").mkdir()
    (unlabelled / "labelsTs").mkdir()
    for channel in (0, 1):  # a two-channel test case without its label
        datasets.save(
            np.zeros((8, 8, 8), np.float32), unlabelled / f"imagesTs/x_000{channel}.nii.gz"
        )
    (tmp_path / "results" / "empty").mkdir(parents=True)
    known = tmp_path / "results" / "known"
    known.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{known / 'study.db'}", study_name="known")
    study.add_trial(optuna.trial.create_trial(value=0.5))  # completed, never trained by nas
    model = tmp_path / "model"
    model.mkdir()
    (model / "architecture.yaml").write_text("format_version: 1\narchitecture: {depth: 0}\n")
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    datasets.save(np.zeros((8, 8, 8), np.uint8), tmp_path / "pred" / "a.nii.gz")
    datasets.save(np.zeros((8, 8, 9), np.uint8), tmp_path / "ref" / "a.nii.gz")
    cases = {
        ("run", "bad.yaml"): "bad.yaml: not valid YAML",
        ("run", "space.yaml", "--set", "train.epochs=0"): "--set: train.epochs:",
        ("run", "space.yaml", "--set", "study.budget=1"): "--set: a budget of 1 optimiser steps",
        ("run", "space.yaml", "--set", "train.augment_probability=1.5"): (
            "--set: train.augment_probability: invalid value 1.5"
        ),
        (
            "run",
            "space.yaml",
            "--set",
            "train.patch_size_2d={type: categorical, choices: [[32, 32], [2, 2]]}",
        ): "--set: train.patch_size_2d.choices[1]: [2, 2] is smaller than [4, 4]",
        ("run", "space.yaml", "--processes", "-1"): "--processes: must be at least 1, not -1",
        ("run", "space.yaml", "--data", "missing"): "missing: dataset folder not found",
        ("run", "space.yaml", "--data", "corrupt"): f"{truncated.relative_to(tmp_path)}: cannot",
        ("run", "space.yaml", "--data", "unlabelled"): (
            "unlabelled/imagesTs/x_0000.nii.gz: test image without a label"
        ),
        ("export", "results/empty"): "results/empty: holds no study.db",
        ("export", "results/known", "--trial", "7"): "--trial: study 'known' has no trial 7",
        ("export", "results/known", "--trial", "0"): "results/known: trial 0 has no weights",
        (
            "retrain",
            "results/known",
            "--trials",
            "7",
        ): "sqlite:///results/known/study.db: study 'known' does not record",
        ("retrain", "results/known", "--processes", "0"): "--processes: must be at least 1, not 0",
        ("report", "results/empty"): "results/empty: holds no study.db",
        ("dashboard", "results/empty"): "results/empty: holds no study.db",
        ("predict", "missing", "pred", "out"): "missing: not found",
        ("predict", "model", "pred", "out"): "model/architecture.yaml: not a valid model",
        ("predict", "model", "pred", "out", "--overlap", "1"): (
            "--overlap: must be at least 0 and below 1, not 1.0"
        ),
        ("evaluate", "pred", "ref"): "pred/a.nii.gz: shape",
    }
    argvs = [list(argv) for argv in cases]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, json.dumps(argvs)],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for (argv, expected), (code, err) in zip(cases.items(), answers, strict=True):
        assert code == 2, (argv, code, err)
        # One line, after whatever a progress bar drew (with carriage returns) and cleared.
        assert err.count("\n") == 1, (argv, err)
        assert err.split("\r")[-1].startswith(f"error: {expected}"), (argv, err)
