"""`nas.run SPACE --set key.path=value --data PATH`: one YAML, many runs; the effective space
is validated like the file, saved beside the study, and a resume with another one says what
changed."""

from __future__ import annotations

import pytest
import yaml

from .conftest import run_cli, tiny_space_yaml


def _error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "train.epochs=0",
            "error: --set: train.epochs: Input should be greater than or equal to 1",
        ),
        ("train.epochs", "error: --set: 'train.epochs' is not key.path=value"),
        ("study..seed=1", "error: --set: 'study..seed=1' is not key.path=value"),
        ("train.epochs=[1", "error: --set train.epochs: not valid YAML"),
        ("train.no_such_key=1", "error: --set: train.no_such_key: unknown parameter"),
        (
            "train.epochs.low=1",
            "error: --set: train.epochs.low: epochs holds a value, not a section",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_and_nothing_is_created(tmp_path, setting, message):
    (tmp_path / "space.yaml").write_text("train: {epochs: 30}\n")
    result = run_cli("nas.run", "space.yaml", "--set", setting, cwd=tmp_path)
    assert _error(result).startswith(message)
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_settings_and_data_make_the_effective_space_saved_beside_the_study(tmp_path, tiny_dataset):
    # The file names a dataset that is not there: --data replaces it (and its synthetic spec).
    space = tiny_space_yaml(tmp_path / "elsewhere", n_trials=3)
    (tmp_path / "space.yaml").write_text(space)
    args = ["--data", str(tiny_dataset), "--set", "study.n_trials=1", "--set", "train.epochs=1"]
    result = run_cli("nas.run", "space.yaml", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "elsewhere").exists()
    saved = yaml.safe_load((tmp_path / "results/tiny/space.yaml").read_text())
    assert saved["data"]["path"] == str(tiny_dataset) and "synthetic" not in saved["data"]
    assert saved["train"]["epochs"] == 1 and saved["study"]["n_trials"] == 1
    assert saved["search"] == yaml.safe_load(space)["search"]  # the rest as the file says

    again = run_cli("nas.run", "space.yaml", *args, "--set", "train.epochs=2", cwd=tmp_path)
    message = _error(again)
    assert "another search space" in message and "epochs" in message
    assert yaml.safe_load((tmp_path / "results/tiny/space.yaml").read_text()) == saved
