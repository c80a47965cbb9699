"""`python -m nas.run SPACE.yaml`: start or resume a search and keep results/<study>/ current.

A thin command line over space, data, study and results: parse options, load and check
everything a trial needs before the first one starts, run the trials with a progress bar and
one line per finished trial, and map user mistakes to one message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from nas.cli import device_option, exit_code
from nas.data import load_dataset, split_dataset
from nas.exported import describe_data
from nas.report import write_report
from nas.results import write_results
from nas.space import load_space, warm_start_params
from nas.study import default_storage, make_objective, n_finished, open_study
from nas.train import CandidateFailed


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nas.run",
        description="Search U-Net architectures: a Pareto front of validation IoU vs parameters. "
        "Running the same command again continues the same study.",
    )
    parser.add_argument("space", type=Path, help="search-space YAML, e.g. search_spaces/unet.yaml")
    parser.add_argument(
        "--n-trials", type=_positive_int, help="finished trials the study should reach in total"
    )
    parser.add_argument(
        "--timeout", type=_positive_float, help="seconds before no new trial starts"
    )
    parser.add_argument("--study-name", help="study name (default: study.name in the YAML)")
    parser.add_argument(
        "--storage", help="Optuna storage URL (default: sqlite:///RESULTS_DIR/NAME/study.db)"
    )
    parser.add_argument("--results-dir", type=Path, default=Path("results"))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--seed", type=int, help="sampler and training seed")
    return parser.parse_args(argv)


def _trial_line(trial: FrozenTrial) -> str:
    attrs = trial.user_attrs
    dims = attrs.get("unet_config", {}).get("spatial_dims", "?")
    params = f"{attrs['n_params']:>10,}" if "n_params" in attrs else " " * 10
    last_iou = trial.values[0] if trial.values else attrs.get("val_iou")
    iou = f"{last_iou:.3f}" if last_iou is not None else "  -  "
    line = (
        f"trial {trial.number:3d}  {dims}D  params {params}  IoU {iou}  "
        f"{attrs.get('seconds', 0.0):6.1f}s  {trial.state.name}"
    )
    if "fail_reason" in attrs:
        line += f"  ({attrs['fail_reason']})"
    return line


def run(args: argparse.Namespace) -> int:
    space = load_space(args.space)
    overrides = {
        "n_trials": args.n_trials,
        "timeout": args.timeout,
        "name": args.study_name,
        "seed": args.seed,
    }
    study_cfg = space.study.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    space = space.model_copy(update={"study": study_cfg})
    device = device_option(args.device)

    dataset = load_dataset(space.data)
    train_cases, val_cases = split_dataset(dataset, space.data)
    study_dir = args.results_dir / study_cfg.name
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = args.storage or default_storage(study_dir)
    warm_start = [warm_start_params(space, fields) for fields in study_cfg.enqueue]
    study = open_study(study_cfg, storage, warm_start)
    # What a later step (nas.retrain, another worker) needs to find and prepare the data.
    study.set_user_attr("data_config", space.data.to_dict())
    study.set_user_attr("data_description", describe_data(dataset))

    already = n_finished(study)
    remaining = study_cfg.n_trials - already
    print(
        f"study {study_cfg.name!r} in {storage}: {already} finished trials, "
        f"{max(remaining, 0)} to run on {device} "
        f"({len(train_cases)} training / {len(val_cases)} validation cases, "
        f"preprocessed in {dataset.cache})"
    )
    if remaining > 0:
        objective = make_objective(
            space, train_cases, val_cases, dataset.in_channels, dataset.n_classes, device, study_dir
        )
        with tqdm(total=remaining, unit="trial", dynamic_ncols=True) as progress:

            def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
                write_results(study, study_dir)
                write_report(study, study_dir)
                progress.write(_trial_line(trial))
                progress.update(1)

            try:
                study.optimize(
                    objective,
                    n_trials=remaining,
                    timeout=study_cfg.timeout,
                    catch=(CandidateFailed,),
                    callbacks=[after_trial],
                )
            except KeyboardInterrupt:
                write_results(study, study_dir)
                write_report(study, study_dir)
                print("interrupted: finished trials are kept; run the same command to continue")
                return 130

    front = write_results(study, study_dir)
    write_report(study, study_dir)
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    print(f"{len(completed)} completed trials; Pareto front of {len(front)}:")
    for trial in front:
        print("  " + _trial_line(trial))
    print(
        f"results in {study_dir}/ (report.html, trials.csv, pareto.csv, pareto.png, "
        "checkpoints/, artifacts/)"
    )
    custom = f" --storage {storage}" if args.storage else ""
    print(f"inspect with: python -m nas.dashboard {study_dir}{custom}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
