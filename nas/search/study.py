"""The Optuna study: create it or open it to continue, with its sampler, and count its trials.

A study keeps the objectives it was created with in its user attrs, so every tool that opens
it later reads them back; trials a Ctrl-C abandoned are enqueued again when it is resumed.
What a trial does is nas/search/trial.py; how many trials a run spends,
nas/search/schedule/policy.py.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.core.errors import NasError
from nas.search.objectives import (
    DEFAULT_OBJECTIVES,
    directions,
)
from nas.search.record import StudyRecord, TrialRecord, carried, write_study
from nas.search.sampler import LineageSampler
from nas.search.schedule.continuation import lineage_attrs
from nas.search.space import StudySection
from nas.search.storage import Access, load_study, open_storage, sqlite_url

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"


def default_storage(study_dir: Path) -> str:
    """The URL of `study_dir`/study.db, whatever characters the folder's name holds."""
    return sqlite_url(study_dir / "study.db")


def make_sampler(
    cfg: StudySection, n_existing_trials: int, worker_salt: int = 0
) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already run, so a resumed study does not replay the
    # random draws of its first run, and by the worker, so that workers started together
    # do not draw the same candidates.
    seed = (cfg.seed + n_existing_trials + 1_000_003 * worker_salt) % 2**32
    if cfg.sampler == "nsga2":
        kwargs = {"population_size": cfg.population_size} if cfg.population_size else {}
        return LineageSampler(optuna.samplers.NSGAIISampler(seed=seed, **kwargs))
    if cfg.sampler == "tpe":
        # multivariate + group: one joint model per set of parameters that occur together,
        # so the parameters drawn under a `when` (3D kernels, deeper skips) are modelled too;
        # constant_liar: workers running at once do not all pick the same promising region.
        with warnings.catch_warnings():  # Optuna marks these options experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            tpe = optuna.samplers.TPESampler(
                seed=seed,
                multivariate=True,
                group=True,
                constant_liar=True,
                n_startup_trials=cfg.startup_trials,
            )
        # One observation per candidate, at the fidelity it reached (nas/search/sampler.py).
        return LineageSampler(tpe)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(
    cfg: StudySection,
    storage: str,
    warm_start: Sequence[dict] = (),
    requeue_interrupted: bool = True,
    worker_salt: int = 0,
) -> optuna.Study:
    """Create the study, or load it with the same name from `storage` to continue it.

    warm_start: Optuna parameters of architectures a new study runs first. Trials a Ctrl-C
    or SIGTERM abandoned in an earlier run are enqueued again (once).
    worker_salt: different for each worker that may start at the same time as another.
    """
    storage_obj = open_storage(storage, cfg.heartbeat)
    try:
        try:
            study_id = storage_obj.get_study_id_from_name(cfg.name)
        except KeyError:  # a new study
            study_id = None
        n_existing = 0
        if study_id is not None:
            _check_objectives(storage_obj, study_id, cfg, storage)
            n_existing = storage_obj.get_n_trials(study_id)
        study = optuna.create_study(
            storage=storage_obj,
            study_name=cfg.name,
            directions=directions(cfg.objectives),
            sampler=make_sampler(cfg, n_existing, worker_salt),
            load_if_exists=True,
        )
        if study_id is None:
            constraints = {k: v.model_dump(exclude_none=True) for k, v in cfg.constraints.items()}
            write_study(study, objectives=list(cfg.objectives), constraints=constraints)
    except NasError:
        raise
    except Exception as err:  # SQLAlchemy and Optuna raise many types for a bad URL
        raise NasError(storage, f"cannot open the study storage ({err})") from None
    if study_id is None:
        for params in warm_start:
            study.enqueue_trial(params, user_attrs=carried(warm_start=True))
    elif requeue_interrupted:
        _retry_interrupted(study)
    return study


def _check_objectives(
    storage_obj: optuna.storages.BaseStorage, study_id: int, cfg: StudySection, url: str
) -> None:
    """A study keeps the objectives it was created with (one from before they were
    configurable: [iou, params])."""
    kept = StudyRecord.in_storage(storage_obj, study_id).objectives
    if kept is None:
        found = [d.name.lower() for d in storage_obj.get_study_directions(study_id)]
        if found != directions(DEFAULT_OBJECTIVES):  # not a study nas wrote
            raise NasError(url, f"study {cfg.name!r} exists with directions {found}")
        kept = list(DEFAULT_OBJECTIVES)
    if list(kept) != list(cfg.objectives):
        raise NasError(
            url,
            f"study {cfg.name!r} was created with objectives {list(kept)}; the space asks for "
            f"{list(cfg.objectives)} (use another study name, or the same objectives)",
        )


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of FAIL trials that another trial reruns (a lost worker's, or interrupted)."""
    retried = set()
    for trial in trials:
        source = trial.system_attrs.get("failed_trial", TrialRecord.of(trial).retry_of)
        if source is not None:
            retried.add(int(source))
    return retried


def _retry_interrupted(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for trial in trials:
        interrupted = TrialRecord.of(trial).fail_reason == INTERRUPTED
        if trial.state == TrialState.FAIL and interrupted and trial.number not in retried:
            attrs = carried(retry_of=trial.number) | lineage_attrs(trial)
            study.enqueue_trial(trial.params, user_attrs=attrs)


def load_results_study(
    results: Path, storage: str | None = None, access: Access = "read"
) -> optuna.Study:
    """The study behind a results folder of nas.run (named after the folder: `.` is the
    folder it stands for). The storage must hold it; `access` as in nas/search/storage.py: "read"
    for the commands that write nothing into it."""
    if storage is None:
        if not (results / "study.db").exists():
            raise NasError(results, "holds no study.db: not a results folder of nas.run")
        storage = default_storage(results)
    return load_study(storage, study_folder_name(results), access)


def study_folder_name(results: Path) -> str:
    """The name of the study whose results folder is `results` (its last component once
    `.` and `..` are resolved; a symbolic link keeps its own name)."""
    return Path(os.path.abspath(results)).name


def n_settled(study: optuna.Study) -> int:
    """Finished new candidates, a failed trial that is rerun counting once (through its rerun)
    and a promoted candidate's continuation not at all."""
    return settled_count(study.get_trials(deepcopy=False))


def is_new(trial: FrozenTrial) -> bool:
    """A new candidate, not a promoted one's continuation."""
    return TrialRecord.of(trial).continues is None


def settled_count(trials: Sequence[FrozenTrial]) -> int:
    """`n_settled` of trials already read."""
    finished = [t for t in trials if t.state in FINISHED_STATES and is_new(t)]
    retried = retried_numbers(trials)
    return sum(1 for t in finished if not (t.state == TrialState.FAIL and t.number in retried))
