"""Multi-fidelity: retraining front members at the full budget, recorded apart from the search."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import torch
import yaml

from nas.data import DataConfig, load_dataset
from nas.search.record import StudyRecord, TrialRecord
from tests.conftest import run_cli, tiny_space_yaml, user_error

pytestmark = pytest.mark.slow


def _storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'results/tiny/study.db'}"


def test_retrain_records_a_labelled_study_and_leaves_the_search_alone(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=3))
    assert run_cli("nas.run", "space.yaml", cwd=tmp_path).returncode == 0
    search = optuna.load_study(study_name="tiny", storage=_storage(tmp_path))
    before = {t.number: t.values for t in search.trials}
    best = max(search.best_trials, key=lambda t: t.values[0])

    result = run_cli("nas.retrain", "results/tiny", "--top", "1", "--epochs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    retrained = optuna.load_study(study_name="tiny-retrain", storage=_storage(tmp_path)).trials
    assert len(retrained) == 1
    entry = retrained[0]
    assert TrialRecord.of(entry).source_trial == best.number
    assert TrialRecord.of(entry).epochs_run == 3 and sorted(entry.intermediate_values) == [1, 2, 3]
    assert entry.values[1] == best.values[1]  # the same architecture
    assert entry.params == best.params
    after = optuna.load_study(study_name="tiny", storage=_storage(tmp_path))
    assert {t.number: t.values for t in after.trials} == before
    table = pd.read_csv(tmp_path / "results/tiny/retrained.csv")
    assert list(table.trial) == [best.number]
    assert (tmp_path / f"results/tiny/retrained/checkpoints/trial_{best.number:04d}.pt").exists()


def test_retrain_refuses_unknown_trials_and_folders(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=1))
    assert run_cli("nas.run", "space.yaml", cwd=tmp_path).returncode == 0
    unknown = run_cli("nas.retrain", "results/tiny", "--trials", "7", cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: --trials: study 'tiny' has no trial '7'"
    missing = run_cli("nas.retrain", "results/nothing", cwd=tmp_path)
    assert missing.returncode == 2 and "holds no study.db" in missing.stderr


def test_all_cases_trains_the_final_model_that_export_then_takes(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=1))
    assert run_cli("nas.run", "space.yaml", cwd=tmp_path).returncode == 0
    assert "--all-cases: trains one model on every case; --folds one per fold" in user_error(
        run_cli("nas.retrain", "results/tiny", "--all-cases", "--folds", "all", cwd=tmp_path)
    )
    assert not (tmp_path / "results/tiny/retrained").exists()
    result = run_cli(
        "nas.retrain",
        "results/tiny",
        "--trials",
        "0",
        "--all-cases",
        "--epochs",
        "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    weights = tmp_path / "results/tiny/retrained/all_cases/checkpoints/trial_0000.pt"
    assert weights.is_file()
    retrain = optuna.load_study(study_name="tiny-retrain", storage=_storage(tmp_path))
    recorded = StudyRecord.of(retrain).all_cases["0"]
    cases = len(load_dataset(DataConfig(path=tiny_dataset)).cases)  # the validation fold's too
    assert recorded["cases"] == cases and recorded["epochs_run"] == 2
    assert retrain.trials == []  # nothing validated, so nothing to rank among the retrained
    exported = tmp_path / "model"
    result = run_cli("nas.export", "results/tiny", "--format", "none", "--out", str(exported),
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = yaml.safe_load((exported / "architecture.yaml").read_text())
    assert card["source"]["weights"]["kind"] == "all-cases"
    assert card["source"]["weights"]["epochs_run"] == 2
    state = torch.load(weights, weights_only=True)
    saved = torch.load(exported / "weights.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in state.items() if k in saved)
