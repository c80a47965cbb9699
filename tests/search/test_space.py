"""The search-space YAML: every mistake is one message naming the file and key, exit code 2."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from nas.core.errors import NasError
from nas.search.draw import param_distribution, sample, warm_start_params
from nas.search.space import describe_space
from nas.search.space_file import load_space
from tests.conftest import run_cli, tiny_space_yaml, user_error

BAD_SPACES = {
    "unknown_key": ("search:\n  depthh: 3\n", "search.depthh: unknown parameter"),
    "unknown_section": ("serach:\n  depth: 3\n", "serach: unknown key"),
    "unknown_spec_key": (
        "search:\n  depth: {type: int, low: 1, high: 3, lwo: 2}\n",
        "search.depth.lwo: unknown key",
    ),
    "wrong_type": ("search:\n  depth: deep\n", "search.depth: invalid value 'deep'"),
    "wrong_type_in_train": ("train:\n  epochs: [1, 2]\n", "train.epochs: invalid value"),
    "wrong_study_type": ("study:\n  n_trials: ten\n", "study.n_trials"),
    "low_above_high": (
        "search:\n  depth: {type: int, low: 5, high: 2}\n",
        "search.depth: low (5) is greater than high (2)",
    ),
    "float_low_above_high": (
        "train:\n  learning_rate: {type: float, low: 0.1, high: 0.01}\n",
        "train.learning_rate: low (0.1) is greater than high (0.01)",
    ),
    "empty_choices": (
        "search:\n  norm: {type: categorical, choices: []}\n",
        "search.norm.choices",
    ),
    "invalid_choice": (
        "search:\n  norm: {type: categorical, choices: [batch, layer]}\n",
        "search.norm: invalid value 'layer'",
    ),
    "unknown_spec_type": (
        "search:\n  depth: {type: integer, low: 1, high: 3}\n",
        "search.depth",
    ),
    "when_unknown_parameter": (
        "search:\n  dropout: {type: float, low: 0, high: 0.3, when: {spatial_dim: 3}}\n",
        "search.dropout.when.spatial_dim: names no parameter",
    ),
    "when_later_parameter": (
        "search:\n  dropout: {type: float, low: 0, high: 0.3, when: {depth: 3}}\n  depth: 3\n",
        "search.dropout.when.depth: names no parameter declared before",
    ),
    "per_stage_on_scalar_field": (
        "search:\n  norm: {type: categorical, choices: [batch], per_stage: true}\n",
        "search.norm.per_stage",
    ),
    "variants_without_when": (
        "search:\n  spatial_dims: 2\n  kernel_size:\n"
        "    - {type: categorical, choices: [3], when: {spatial_dims: 2}}\n"
        "    - {type: categorical, choices: [5]}\n",
        "search.kernel_size[1]: each of several specs",
    ),
    "inconsistent_fixed_values": (
        "search:\n  spatial_dims: 2\n  anisotropic_stages: 1\n",
        "search: anisotropic_stages applies to 3D networks only",
    ),
    "patch_choice_of_three_axes_in_2d": (
        "train:\n  patch_size_2d: {type: categorical, choices: [[64, 64], [96, 96, 96]]}\n",
        "train.patch_size_2d.choices[1]: [96, 96, 96] is not a 2D patch: give 2 whole numbers",
    ),
    "patch_choice_of_two_axes_in_3d": (
        "train:\n  patch_size_3d: {type: categorical, choices: [[64, 64]]}\n",
        "train.patch_size_3d.choices[0]: [64, 64] is not a 3D patch: give 3 whole numbers",
    ),
    "patch_choice_not_whole_numbers": (
        "train:\n  patch_size_2d: {type: categorical, choices: [[64, 64.5]]}\n",
        "train.patch_size_2d.choices[0]: [64, 64.5] is not a 2D patch",
    ),
    "patch_choice_a_number": (
        "train:\n  patch_size_2d: {type: categorical, choices: [64]}\n",
        "train.patch_size_2d.choices[0]: 64 is not a 2D patch",
    ),
    "patch_choice_too_large": (
        "train:\n  patch_size_2d: {type: categorical, choices: [[2048, 64]]}\n",
        "train.patch_size_2d.choices[0]: [2048, 64] must be between 1 and 1024 per axis",
    ),
    "list_choice_for_a_field_of_one_value": (
        "search:\n  depth: {type: categorical, choices: [[2, 3]]}\n",
        "search.depth.choices[0]: [2, 3] is a list: only patch_size_2d, patch_size_3d take lists",
    ),
    "fixed_patch_below_the_deepest_stride": (
        "search:\n  spatial_dims: 2\n  depth: {type: int, low: 2, high: 5}\n"
        "train:\n  patch_size_2d: [64, 8]\n",
        "train.patch_size_2d: [64, 8] is smaller than [16, 16], the total stride of the "
        "deepest 2D network this space draws (depth 5)",
    ),
    "patch_choice_below_the_deepest_stride": (
        "search:\n  spatial_dims: 2\n  depth: 5\n"
        "train:\n  patch_size_2d: {type: categorical, choices: [[64, 64], [12, 12]]}\n",
        "train.patch_size_2d.choices[1]: [12, 12] is smaller than [16, 16]",
    ),
    "3d_patch_below_the_stride_of_its_last_axis": (
        "search:\n  spatial_dims: 3\n  depth: 4\n"
        "  anisotropic_stages: {type: int, low: 1, high: 2}\n"
        "train:\n  patch_size_3d: {type: categorical, choices: [[32, 32, 2]]}\n",
        "train.patch_size_3d.choices[0]: [32, 32, 2] is smaller than [8, 8, 4]",
    ),
    "augment_probability_above_1": (
        "train:\n  augment_probability: 1.5\n",
        "train.augment_probability: invalid value 1.5: Input should be less than or equal to 1",
    ),
    "augment_probability_spec_above_1": (
        "train:\n  augment_probability: {type: float, low: 0.0, high: 1.5}\n",
        "train.augment_probability: invalid value 1.5: Input should be less than or equal to 1",
    ),
    "batch_size_spec_below_1": (
        "train:\n  batch_size_2d: {type: int, low: 0, high: 8}\n",
        "train.batch_size_2d: invalid value 0: Input should be greater than or equal to 1",
    ),
    "bad_data_section": ("data:\n  n_folds: 1\n", "data.n_folds"),
    "fold_out_of_range": ("data:\n  n_folds: 3\n  fold: 3\n", "fold 3 does not exist"),
    "bad_data_format": ("data:\n  format: dicom\n", "data.format"),
    "bad_sampler": ("study:\n  sampler: cmaes\n", "study.sampler"),
    "not_a_mapping": ("- search\n- train\n", "must be a mapping"),
    "malformed_yaml": ("search: [depth\n", "not valid YAML"),
    "python_tag_refused": ("search: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_is_reported_by_load_space(case, tmp_path):
    text, expected = BAD_SPACES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(Exception) as info:
        load_space(path)
    assert type(info.value).__name__ == "NasError"
    assert str(path) in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "case",
    [
        "unknown_key",
        "low_above_high",
        "when_unknown_parameter",
        "patch_choice_of_three_axes_in_2d",
        "patch_choice_below_the_deepest_stride",
    ],
)
def test_bad_space_exits_2_with_one_line_and_trains_nothing(case, tmp_path):
    text, expected = BAD_SPACES[case]
    (tmp_path / "space.yaml").write_text(text)
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: space.yaml: ")
    assert expected in lines[0]
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "data").exists()


def test_a_file_that_is_not_text_is_not_valid_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(NasError, match=r"space\.yaml: not valid YAML: not UTF-8 text"):
        load_space(path)


def test_missing_file_exits_2(tmp_path):
    result = run_cli("nas.run", "nowhere.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: nowhere.yaml: file not found"


def test_default_space_is_valid_and_covers_the_builder():
    space = load_space("search_spaces/unet.yaml")
    for name in (
        "spatial_dims",
        "depth",
        "base_channels",
        "channel_growth",
        "kernel_size",
        "convs_per_stage",
        "norm",
        "activation",
        "upsampling",
        "dropout",
        "residual",
        "skip_mode",
        "skips",
        "anisotropic_stages",
    ):
        assert name in space.search, name
    assert space.study.sampler == "tpe"


def _sample_many(space, n=40):
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, sample(space, trial, in_channels=1, out_channels=1, seed=0)))
        study.tell(trial, (0.0, 1.0))
    return out


def test_conditional_parameter_is_sampled_only_when_its_condition_holds(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(tiny_space_yaml(tmp_path / "data"))
    drawn = _sample_many(load_space(path))
    for trial, candidate in drawn:
        assert ("anisotropic_stages" in trial.params) == (candidate.unet.spatial_dims == 3)
        if candidate.unet.spatial_dims == 2:
            assert candidate.unet.anisotropic_stages == 0
    assert {c.unet.spatial_dims for _, c in drawn} == {2, 3}


def test_per_stage_skips_follow_the_sampled_depth(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(tiny_space_yaml(tmp_path / "data"))
    drawn = _sample_many(load_space(path))
    for trial, candidate in drawn:
        depth = candidate.unet.depth
        assert len(candidate.unet.skips_per_stage) == depth - 1
        assert sorted(k for k in trial.params if k.startswith("skips_")) == [
            f"skips_{i}" for i in range(depth - 1)
        ]
    assert any(not any(c.unet.skips_per_stage) and c.unet.depth > 1 for _, c in drawn)


def test_variants_give_one_field_different_ranges(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "search:\n  spatial_dims: {type: categorical, choices: [2, 3]}\n  kernel_size:\n"
        "    - {type: categorical, choices: [7], when: {spatial_dims: 2}}\n"
        "    - {type: categorical, choices: [3, 5], when: {spatial_dims: 3}}\n"
        "train:\n  learning_rate: {type: float, low: 0.001, high: 0.01, log: true}\n"
    )
    for trial, candidate in _sample_many(load_space(path), n=20):
        if candidate.unet.spatial_dims == 2:
            assert candidate.unet.kernel_size == 7 and "kernel_size#1" in trial.params
        else:
            assert candidate.unet.kernel_size in (3, 5) and "kernel_size#2" in trial.params
        assert 0.001 <= candidate.train.learning_rate <= 0.01


def test_the_default_sampler_models_every_searched_parameter(monkeypatch):
    """TPE (multivariate, grouped) draws no parameter on its own once its startup trials have
    shown every parameter: the `when` ones (3D kernels, deeper skips) are modelled too."""
    from nas.search.study import make_sampler

    space = load_space("search_spaces/unet.yaml")
    assert space.study.sampler == "tpe"
    planned = {"batch_size_2d": 16, "patch_size_2d": (64, 64), "batch_size_3d": 2,
               "patch_size_3d": (32, 32, 32)}  # fmt: skip  # what `auto` plans from data
    space = space.model_copy(update={"train": {**space.train, **planned}})
    independent: list[tuple[int, str]] = []
    original = optuna.samplers.TPESampler.sample_independent

    def spy(self, study, trial, name, distribution):
        independent.append((trial.number, name))
        return original(self, study, trial, name, distribution)

    monkeypatch.setattr(optuna.samplers.TPESampler, "sample_independent", spy)
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=make_sampler(space.study, 0)
    )
    names_by_trial = []

    def objective(trial):
        candidate = sample(space, trial, 1, 1, trial.number)
        names_by_trial.append(set(trial.params))
        depth, dims = candidate.unet.depth, candidate.unet.spatial_dims
        return 0.5 + 0.01 * depth - 0.05 * dims, candidate.unet.base_channels * depth

    startup = space.study.startup_trials
    study.optimize(objective, n_trials=startup + 10)
    first_seen: dict[str, int] = {}
    for number, names in enumerate(names_by_trial):
        for name in names:
            first_seen.setdefault(name, number)
    fields = {name.split("#")[0] for name in first_seen}
    assert {"spatial_dims", "depth", "base_channels", "learning_rate"} <= fields
    assert {"kernel_size#1", "base_channels#2", "anisotropic_stages", "skips_2"} <= set(first_seen)
    all_seen = max(startup - 1, *first_seen.values())
    assert all_seen < startup + 5, "too few trials left to check"
    constant = {n for t in study.trials for n, d in t.distributions.items() if d.single()}
    later = [(n, name) for n, name in independent if n > all_seen and name not in constant]
    assert later == []
    assert any(n < startup for n, _ in independent)  # the spy does see independent draws


PATCH_SPACE = """\
search:
  spatial_dims: {type: categorical, choices: [2, 3]}
  depth: {type: int, low: 2, high: 4}
train:
  patch_size_2d: {type: categorical, choices: [[64, 64], [96, 96]]}
  patch_size_3d: {type: categorical, choices: [[32, 32, 16], [48, 48, 32]]}
"""


def test_patch_choices_are_drawn_as_sizes_and_recorded_as_96x96(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(PATCH_SPACE)
    space = load_space(path)
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    for _ in range(12):
        trial = study.ask()
        candidate = sample(space, trial, in_channels=1, out_channels=1, seed=0)
        study.tell(trial, 0.0)
        assert isinstance(candidate.train.patch_size_2d, tuple)
        assert trial.params["patch_size_2d"] == "x".join(map(str, candidate.train.patch_size_2d))
        assert trial.params["patch_size_3d"] == "x".join(map(str, candidate.train.patch_size_3d))
    stored = optuna.load_study(study_name=study.study_name, storage=study._storage).trials
    assert {t.params["patch_size_2d"] for t in stored} == {"64x64", "96x96"}
    assert {t.params["patch_size_3d"] for t in stored} == {"32x32x16", "48x48x32"}
    for name in ("patch_size_2d", "patch_size_3d"):
        assert stored[0].distributions[name] == param_distribution(space, name)


def test_an_enqueued_patch_is_drawn_as_given(tmp_path):
    path = tmp_path / "space.yaml"
    enqueue = "study:\n  enqueue:\n    - {spatial_dims: 2, patch_size_2d: [96, 96]}\n"
    path.write_text(PATCH_SPACE + enqueue)
    space = load_space(path)
    params = warm_start_params(space, space.study.enqueue[0])
    assert params == {"spatial_dims": 2, "patch_size_2d": "96x96"}
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    study.enqueue_trial(params)
    candidate = sample(space, study.ask(), in_channels=1, out_channels=1, seed=0)
    assert candidate.unet.spatial_dims == 2 and candidate.train.patch_size_2d == (96, 96)


def test_an_enqueued_patch_outside_the_choices_is_refused(tmp_path):
    path = tmp_path / "space.yaml"
    enqueue = "study:\n  enqueue:\n    - {spatial_dims: 2, patch_size_2d: [80, 80]}\n"
    path.write_text(PATCH_SPACE + enqueue)
    with pytest.raises(NasError) as err:
        load_space(path)
    assert err.value.source == str(path)
    assert err.value.reason == (
        "study.enqueue[0]: patch_size_2d: [80, 80] is outside the search space of patch_size_2d"
    )


def test_a_space_with_patch_choices_describes_itself_as_plain_lists(tmp_path):
    """What a study records of its space, to compare a resume against: JSON, sizes as lists."""
    path = tmp_path / "space.yaml"
    path.write_text(PATCH_SPACE)
    described = describe_space(load_space(path))
    assert described["train"]["patch_size_2d"] == [
        {"type": "categorical", "choices": [[64, 64], [96, 96]]}
    ]
    assert described == describe_space(load_space(path))


def test_a_3d_patch_need_only_span_the_stride_its_anisotropic_stages_leave(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "search:\n  spatial_dims: 3\n  depth: 4\n"
        "  anisotropic_stages: {type: int, low: 1, high: 2}\n"
        "train:\n  patch_size_3d: {type: categorical, choices: [[32, 32, 4], [8, 8, 8]]}\n"
    )
    space = load_space(path)  # stride 8x8x4: the z axis keeps full resolution once
    drawn = {c.train.patch_size_3d for _, c in _sample_many(space, n=10)}
    assert drawn == {(32, 32, 4), (8, 8, 8)}


def test_a_patch_the_space_never_trains_is_not_held_to_the_stride(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("search:\n  spatial_dims: 2\n  depth: 6\ntrain:\n  patch_size_3d: [8, 8, 8]\n")
    assert load_space(path).train["patch_size_3d"] == (8, 8, 8)


def test_batch_foreground_optimizer_and_augmentation_are_searchable(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "train:\n"
        "  batch_size_2d: {type: int, low: 4, high: 16, step: 4}\n"
        "  batch_size_3d: {type: categorical, choices: [1, 2]}\n"
        "  foreground_fraction: {type: float, low: 0.2, high: 0.8}\n"
        "  optimizer: {type: categorical, choices: [adamw, sgd]}\n"
        "  augment_probability: {type: float, low: 0.0, high: 0.5}\n"
    )
    drawn = _sample_many(load_space(path), n=30)
    for trial, candidate in drawn:
        train = candidate.train
        assert train.batch_size_2d == trial.params["batch_size_2d"] in (4, 8, 12, 16)
        assert train.batch_size_3d == trial.params["batch_size_3d"] in (1, 2)
        assert train.foreground_fraction == trial.params["foreground_fraction"]
        assert 0.2 <= train.foreground_fraction <= 0.8
        assert train.optimizer == trial.params["optimizer"]
        assert train.augment_probability == trial.params["augment_probability"] <= 0.5
    assert {c.train.optimizer for _, c in drawn} == {"adamw", "sgd"}
    assert len({c.train.batch_size_2d for _, c in drawn}) == 4


def test_augment_probability_above_1_from_the_command_line_is_one_line(tmp_path):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tmp_path / "data"))
    result = run_cli(
        "nas.run", "space.yaml", "--set", "train.augment_probability=1.5", cwd=tmp_path
    )
    assert user_error(result) == (
        "error: --set: train.augment_probability: invalid value 1.5: "
        "Input should be less than or equal to 1"
    )
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[2] / "search_spaces").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_shipped_search_space_is_valid(path):
    space = load_space(path)
    assert space.study.name and space.study.objectives
    if "whole_volumes" in path.name:  # 3D only, with the rare validation it is sized for
        assert space.search["spatial_dims"] == 3 and space.study.pruner.type == "none"
        assert space.study.validation.patches_per_case < 16


def test_more_validation_cases_than_the_fold_holds_is_one_line_and_writes_nothing(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(tiny_space_yaml(tmp_path / "data"))  # 6 cases, 3 folds: 2 validate
    results = tmp_path / "results"
    result = run_cli("nas.run", str(path), "--set", "study.validation.cases=3",
                     "--results-dir", str(results), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # after the preprocessing bar
        "error: --set: study.validation.cases is 3, but the fold has 2 validation cases (fold 0)"
    )
    assert not results.exists()


def test_the_search_validates_on_a_seeded_subset_of_the_fold():
    from nas.search.scoring import search_validation_cases

    cases = [f"case_{i}" for i in range(10)]
    chosen = search_validation_cases(cases, 4, seed=0)
    assert len(set(chosen)) == 4 and chosen == sorted(chosen)  # the fold's order kept
    assert search_validation_cases(cases, 4, seed=0) == chosen
    assert search_validation_cases(cases, 4, seed=1) != chosen
    assert search_validation_cases(cases, None, seed=0) == cases
    with pytest.raises(ValueError, match="is 11, but the fold has 10"):
        search_validation_cases(cases, 11, seed=0)
