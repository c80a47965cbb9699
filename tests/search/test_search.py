"""End to end: the CLI runs a tiny search on real NIfTI files and a real SQLite study."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from nas import UNetConfig, build_unet
from nas.search.record import TrialRecord
from tests.conftest import run_cli, tiny_space_yaml

pytestmark = pytest.mark.slow


def _load(tmp_path, name="tiny"):
    return optuna.load_study(
        study_name=name, storage=f"sqlite:///{tmp_path / 'results' / name / 'study.db'}"
    )


def _search(tmp_path, space: str, *args: str):
    (tmp_path / "space.yaml").write_text(space)
    return run_cli("nas.run", "space.yaml", *args, cwd=tmp_path)


def _non_dominated(rows: pd.DataFrame) -> set[int]:
    front = set()
    for _, a in rows.iterrows():
        dominated = any(
            (b.val_iou >= a.val_iou and b.n_params <= a.n_params)
            and (b.val_iou > a.val_iou or b.n_params < a.n_params)
            for _, b in rows.iterrows()
        )
        if not dominated:
            front.add(int(a.number))
    return front


def test_tiny_search_writes_study_and_results(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=4))
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for n in range(4):
        assert f"trial {n:3d}" in result.stdout

    study = _load(tmp_path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(completed) == 4
    for trial in completed:
        cfg = UNetConfig.from_dict(TrialRecord.of(trial).unet_config)
        assert trial.values[1] == TrialRecord.of(trial).n_params
        assert trial.values[1] == sum(p.numel() for p in build_unet(cfg).parameters())
        assert sorted(trial.intermediate_values) == [1, 2]  # the learning curve, per epoch
        # The objective is the search score, the mean of the last two validations, as the
        # curve and the attrs say.
        curve = trial.intermediate_values
        assert trial.values[0] == pytest.approx((curve[1] + curve[2]) / 2)
        assert trial.values[0] == TrialRecord.of(trial).iou

    out = tmp_path / "results" / "tiny"
    trials = pd.read_csv(out / "trials.csv")
    assert sorted(trials.number) == [0, 1, 2, 3]
    assert {"val_iou", "val_dice", "n_params", "seconds", "depth", "learning_rate"} <= set(trials)
    by_number = {t.number: t for t in completed}
    for row in trials.itertuples():
        assert row.val_iou == pytest.approx(by_number[row.number].values[0], abs=1e-12)
        assert row.n_params == by_number[row.number].values[1]
    pareto = pd.read_csv(out / "pareto.csv")
    assert set(pareto.number) == _non_dominated(trials[trials.state == "COMPLETE"])
    assert list(pareto.n_params) == sorted(pareto.n_params)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Beside the search's score: its error over the validation cases, and the whole
    # validation volumes, predicted once per member after the search.
    assert {"val_iou_se", "val_iou_low", "val_iou_high", "volume_val_iou"} <= set(pareto)
    assert pareto.volume_val_iou.between(0, 1).all() and pareto.val_iou_se.notna().all()
    assert (pareto.val_iou_low <= pareto.val_iou).all()
    assert (pareto.val_iou <= pareto.val_iou_high).all()
    assert not pareto.below_top_rung.any()  # one fidelity: every member trained to the end
    assert f"scored {len(pareto)} front member(s) on 2 whole validation volume(s)" in result.stdout

    # Weights are kept for exactly the front, and load into the architecture they came from.
    saved = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert saved == [f"trial_{n:04d}.pt" for n in sorted(pareto.number)]
    # The best IoU (the smallest network among ties) is never dominated: it is on the front.
    best = max(completed, key=lambda t: (t.values[0], -t.values[1]))
    assert best.number in set(pareto.number)
    model = build_unet(UNetConfig.from_dict(TrialRecord.of(best).unet_config))
    path = out / "checkpoints" / f"trial_{best.number:04d}.pt"
    model.load_state_dict(torch.load(path, weights_only=True))


def test_same_command_resumes_the_study(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=2))
    first = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    first_params = [t.params for t in _load(tmp_path).trials]

    again = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 finished trials, 0 to run" in again.stdout
    assert len(_load(tmp_path).trials) == 2

    more = run_cli("nas.run", "space.yaml", "--n-trials", "3", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    study = _load(tmp_path)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert [t.params for t in study.trials[:2]] == first_params  # earlier trials untouched
    assert study.trials[2].params != study.trials[0].params  # no replay of the first draw
    assert len(pd.read_csv(tmp_path / "results" / "tiny" / "trials.csv")) == 3


def test_cli_overrides_name_storage_and_results_dir(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=5))
    storage = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    result = run_cli(
        "nas.run",
        "space.yaml",
        "--n-trials",
        "1",
        "--study-name",
        "other",
        "--storage",
        storage,
        "--results-dir",
        "out",
        "--device",
        "cpu",
        "--seed",
        "7",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="other", storage=storage)
    assert len(study.trials) == 1
    assert (tmp_path / "out" / "other" / "trials.csv").exists()
    assert not (tmp_path / "out" / "other" / "study.db").exists()


def test_a_failing_candidate_fails_its_trial_and_the_study_goes_on(tmp_path, tiny_dataset):
    # A learning rate of 1e30 makes the loss non-finite within the first epoch.
    space = tiny_space_yaml(tiny_dataset, n_trials=3).replace(
        "learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}",
        "learning_rate: {type: categorical, choices: [1.0e+30, 1.0e-3]}\n  optimizer: sgd",
    )
    result = _search(tmp_path, space)
    assert result.returncode == 0, result.stderr
    study = _load(tmp_path)
    assert len(study.trials) == 3
    states = {t.number: t.state for t in study.trials}
    for trial in study.trials:
        if trial.params["learning_rate"] > 1:
            assert states[trial.number] == TrialState.FAIL
            assert "non-finite" in TrialRecord.of(trial).fail_reason
            assert "FAIL" in result.stdout
        else:
            assert states[trial.number] == TrialState.COMPLETE
    assert set(states.values()) == {TrialState.FAIL, TrialState.COMPLETE}  # both branches ran
    trials = pd.read_csv(tmp_path / "results" / "tiny" / "trials.csv")
    assert "non-finite" in " ".join(trials.fail_reason.dropna())


def test_bad_device_exits_2(tmp_path, tiny_dataset, monkeypatch):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a CUDA machine
    result = run_cli("nas.run", "space.yaml", "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert "error: --device:" in result.stderr and "Traceback" not in result.stderr


def test_an_invalid_sampled_combination_fails_only_its_trial(tmp_path, tiny_dataset):
    # anisotropic_stages without its `when`: a 2D candidate drawing 1 cannot be built.
    space = (
        tiny_space_yaml(tiny_dataset, n_trials=4)
        .replace("spatial_dims: {type: categorical, choices: [2, 3]}", "spatial_dims: 2")
        .replace(", when: {spatial_dims: 3}}", "}")
    )
    result = _search(tmp_path, space)
    assert result.returncode == 0, result.stderr
    trials = _load(tmp_path).trials
    assert len(trials) == 4
    for trial in trials:
        invalid = trial.params["anisotropic_stages"] == 1
        assert (trial.state == TrialState.FAIL) == invalid
        if invalid:
            assert "invalid combination: anisotropic_stages" in TrialRecord.of(trial).fail_reason
    assert {t.state for t in trials} == {TrialState.FAIL, TrialState.COMPLETE}


def test_results_are_written_when_no_trial_completed(tmp_path, tiny_dataset):
    space = tiny_space_yaml(tiny_dataset, n_trials=2).replace(
        "learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}",
        "learning_rate: 1.0e+30\n  optimizer: sgd",
    )
    result = _search(tmp_path, space)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "results" / "tiny"
    assert list(pd.read_csv(out / "trials.csv").state) == ["FAIL", "FAIL"]
    assert pd.read_csv(out / "pareto.csv").empty
    assert (out / "pareto.png").stat().st_size > 0
    assert "0 completed trials; Pareto front of 0" in result.stdout


def test_a_bad_storage_or_a_foreign_study_exits_2_and_is_left_alone(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    bad = run_cli("nas.run", "space.yaml", "--storage", "nosuchdb://x", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: nosuchdb://x: cannot open the study storage")

    storage = f"sqlite:///{tmp_path / 'other.db'}"
    foreign = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    foreign.enqueue_trial({"x": 1.0})
    result = run_cli("nas.run", "space.yaml", "--storage", storage, cwd=tmp_path)
    assert result.returncode == 2 and "exists with directions ['maximize']" in result.stderr
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 1
