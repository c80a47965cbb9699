"""`nas retrain --folds`: chosen members cross-validated, summarised and compared. Each member
is trained on every fold asked for (nas.evaluation.crossval), summarised as mean +- sd in
results/<study>/crossval.csv with the postprocessing its out-of-fold predictions chose; with
two or more members complete, their ensembles are scored out of fold and one chosen
(nas.evaluation.member_ensemble, results/<study>/member_ensembles.csv); where the dataset has
held-out test cases, each member's fold ensemble with and without mirroring is scored on them
next to a single fold's model, and so is the chosen ensemble of members
(results/<study>/ensemble.csv). The report is written last.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.staging import atomic_write
from nas.evaluation.retrain_plan import RetrainOptions

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    import torch
    from optuna.trial import FrozenTrial

    from nas.data import DataConfig
    from nas.data.test_split import TestSplit


def parse_folds(text: str, data: DataConfig) -> list[int]:
    from nas.evaluation.crossval import all_folds

    available = all_folds(data)
    if text == "all":
        return available
    try:
        folds = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise NasError("--folds", f"give 'all' or fold numbers such as 0,1, not {text!r}") from None
    missing = [f for f in folds if f not in available]
    if missing:
        raise NasError(
            "--folds", f"fold {missing[0]} does not exist (the split has folds 0-{available[-1]})"
        )
    return folds


def run_crossval(
    options: RetrainOptions,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    data_cfg: DataConfig,
    storage: str,
    device: torch.device,
) -> int:
    """Cross-validate `chosen` on the folds of --folds, then summarise, choose and compare
    (the module's docstring); report.html is written last."""
    from nas.data import load_dataset
    from nas.data.test_split import find_test_split
    from nas.evaluation.crossval import cross_validate
    from nas.search.companions import open_crossval_study
    from nas.search.record import study_objectives
    from nas.search.report import write_report
    from nas.search.storage import open_storage, redact

    folds = parse_folds(options.folds, data_cfg)
    objectives = study_objectives(study).names
    crossval = open_crossval_study(
        open_storage(storage, access="existing"), study.study_name, objectives
    )
    cross_validate(
        study, chosen, folds, options.results, crossval, options.epochs, device, options.workers
    )
    table = _write_summary(options.results, crossval, study)
    chosen_ensemble = _choose_member_ensemble(options, study, crossval, table, folds, device)
    dataset = load_dataset(data_cfg)
    split = find_test_split(data_cfg, dataset)
    if split is not None and len(folds) > 1:
        _compare_on_held_out(
            options, study, chosen, crossval, data_cfg, folds, chosen_ensemble, split, device
        )
    report = write_report(study, options.results)
    print(
        f"recorded in study {crossval.study_name!r} of {redact(storage)}, "
        f"{options.results}/crossval.csv and {report}"
    )
    return 0


def _write_summary(results: Path, crossval: optuna.Study, study: optuna.Study) -> pd.DataFrame:
    """results/<study>/crossval.csv, a line per member printed: the summary as a table."""
    import pandas as pd

    from nas.search.companions import summary_rows

    table = pd.DataFrame(summary_rows(crossval, study))
    atomic_write(results / "crossval.csv", lambda p: table.to_csv(p, index=False))
    for row in table.itertuples():
        sd = "" if pd.isna(row.cv_iou_sd) else f" +- {row.cv_iou_sd:.4f}"
        print(
            f"trial {row.trial}: IoU {row.cv_iou_mean:.4f}{sd} over folds {row.folds} "
            f"(search: {row.search_val_iou:.4f}); largest component: "
            f"{row.largest_component or 'not applied'}"
        )
    return table


def _compare_on_held_out(
    options: RetrainOptions,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    crossval: optuna.Study,
    data_cfg: DataConfig,
    folds: list[int],
    chosen_ensemble: dict | None,
    split: TestSplit,
    device: torch.device,
) -> None:
    """Each member's fold ensemble, with and without mirroring, beside a single fold's model
    on the held-out cases, and the chosen ensemble of members where it has two or more
    (results/<study>/ensemble.csv, and the crossval study for the report)."""
    import pandas as pd

    from nas.evaluation.crossval import record_ensemble
    from nas.evaluation.heldout import compare_ensemble
    from nas.search.record import StudyRecord
    from nas.search.weights import fold_name, fold_path

    postprocessing = StudyRecord.of(crossval).postprocessing
    rows = []
    for trial in chosen:
        weights = {fold_name(f): options.files.local(fold_path(options.results, trial.number, f))
                   for f in folds}  # fmt: skip
        single = fold_name(data_cfg.fold if data_cfg.fold in folds else folds[0])
        compared = compare_ensemble(
            study, trial, weights, single, split, device,
            postprocessing.get(str(trial.number), []),
        )  # fmt: skip
        record_ensemble(crossval, trial.number, compared)
        rows += compared
    if chosen_ensemble is not None and chosen_ensemble["n_members"] > 1:
        rows.append(_score_member_ensemble(study, options.results, chosen_ensemble, split, device))
        record_ensemble(crossval, -1, rows[-1:])
    ensemble = pd.DataFrame(rows)
    atomic_write(options.results / "ensemble.csv", lambda p: ensemble.to_csv(p, index=False))
    print(ensemble.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _choose_member_ensemble(
    options: RetrainOptions,
    study: optuna.Study,
    crossval: optuna.Study,
    table: pd.DataFrame,
    folds: list[int],
    device: torch.device,
) -> dict | None:
    """With two or more members cross-validated on every fold asked for: each member alone
    and the ensembles of the best 2 and 3, scored out of fold, the best chosen
    (results/<study>/member_ensembles.csv, and the crossval study for nas export)."""
    import pandas as pd

    from nas.evaluation.member_ensemble import score_out_of_fold
    from nas.search.companions import record_member_ensembles

    complete = [r for r in table.itertuples() if len(str(r.folds).split()) == len(folds)]
    if len(complete) < 2 or len(folds) < 2:
        return None
    ranked = [r.trial for r in sorted(complete, key=lambda r: -r.cv_iou_mean)]
    rows, chosen = score_out_of_fold(study, ranked, folds, options.results, device)
    record_member_ensembles(crossval, rows, chosen)
    frame = pd.DataFrame(rows)
    atomic_write(options.results / "member_ensembles.csv", lambda p: frame.to_csv(p, index=False))
    print("out of fold, members and their ensembles:")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    how = "alone" if chosen["n_members"] == 1 else "(nas export --ensemble members)"
    print(f"chosen: {chosen['members']} {how}")
    return chosen


def _score_member_ensemble(
    study: optuna.Study, results: Path, chosen: dict, split: TestSplit, device: torch.device
) -> dict:
    """The chosen ensemble of different members on the held-out cases, exported and
    predicted as a user would (each member with the weights nas export takes by default)."""
    import tempfile

    from nas.deploy.export import export_members
    from nas.evaluation.heldout import score_member_ensemble
    from nas.search.companions import chosen_trials

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = [by_number[n] for n in chosen_trials(chosen)]
    with tempfile.TemporaryDirectory(prefix="nas-members-") as scratch:
        folder = Path(scratch) / "ensemble"
        export_members(study, results, trials, folder, (), "", "folds", False, "none",
                       chosen["largest_component"].split())  # fmt: skip
        scores = score_member_ensemble(folder, split, device)
    return {"trial": chosen["members"], "variant": "members' fold ensembles", **scores}
