"""A search trial's training as it goes (`Progress`): each epoch recorded on the trial (losses,
seconds, steps, the curve and its per-case counts), then judged by the schedule, whose answer
says whether training goes on; handed to `train_candidate` as its `on_epoch`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna

from nas.search.record import TrialRecord, write
from nas.search.schedule.policy import EpochReport, Schedule
from nas.search.scoring import kept_counts
from nas.search.trial_start import SearchRun, Started
from nas.training.fit import EpochResult
from nas.validation.validate import Scores


@dataclass
class Progress:
    """A trial's training as it goes: recorded after each epoch, which the schedule then
    judges (`on_epoch`, handed to `train_candidate`)."""

    trial: optuna.Trial
    schedule: Schedule
    lineage: int
    costs: dict[str, float | None]  # the pruner's, by objective name
    steps_per_epoch: int
    rungs: tuple[int, ...]  # where its segments end
    train_losses: list[float]
    epoch_seconds: list[float]
    curve: dict[int, float]
    # Per-case counts of this trial's validations, by epoch (`scoring.kept_counts` keeps them).
    case_counts: dict[int, tuple] = dataclasses.field(default_factory=dict)
    pruned: list[str] = dataclasses.field(default_factory=list)
    steps: int = 0  # over the trial's segments
    seconds: float = 0.0  # of training and validation, over the trial's segments
    before_segment: float = 0.0  # `seconds` when the current segment began
    go_on: bool = True  # the last rung's answer: train on to the next
    metric: str = "iou"  # what the curve holds (`objectives.curve_metric`)

    @classmethod
    def after(
        cls, run: SearchRun, trial: optuna.Trial, started: Started, quantities: dict
    ) -> Progress:
        """The progress a trial starts from: its parent's history, or none."""
        parent = started.parent
        history = TrialRecord.of(parent) if parent is not None else None
        return cls(
            trial,
            run.schedule,
            started.lineage,
            {name: quantities[name] for name in run.cost_names},
            started.candidate.train.batches_per_epoch,
            started.rungs,
            list(history.train_loss) if history else [],
            list(history.epoch_seconds) if history else [],
            dict(parent.intermediate_values) if parent else {},
            metric=run.metric,
        )

    def on_epoch(self, result: EpochResult) -> bool:
        """Record the epoch; answer whether training goes on."""
        trial = self.trial
        self.train_losses.append(result.train_loss)
        self.epoch_seconds.append(round(result.train_seconds, 3))
        self.steps += self.steps_per_epoch
        # Training and validation: what a step really costs the budget's clock.
        self.seconds = self.before_segment + result.seconds
        write(trial, train_loss=tuple(self.train_losses), epoch_seconds=tuple(self.epoch_seconds),
              steps=self.steps, segment_seconds=round(self.seconds, 3))  # fmt: skip
        if result.scores is None:  # not validated: nothing to judge
            write(trial, epochs_run=result.epoch)
            return True
        self.validated(result.epoch, result.scores)
        write(trial, epochs_run=result.epoch)
        report = EpochReport(
            trial.number,
            self.lineage,
            result.epoch,
            self.curve,
            self.costs,
            self.steps_per_epoch,
            self.seconds / self.steps,
            self.rungs,
        )
        verdict = self.schedule.after_epoch(trial.study.get_trials(deepcopy=False), report)
        if verdict.pruned:
            self.pruned.append(verdict.pruned)
        self.go_on = verdict.go_on
        return verdict.go_on

    def end_segment(self) -> None:
        self.before_segment = self.seconds

    def validated(self, epoch: int, scores: Scores) -> None:
        """Record a validation: on the curve, and its per-case counts. Called after each
        validated epoch, and once more after training for the last epoch, which `fit`
        validates after the fact where its time ran out just after an epoch it did not."""
        if epoch in self.curve and epoch in self.case_counts:
            return
        trial = self.trial
        self.case_counts[epoch] = scores.case_counts
        write(trial, val_case_counts=kept_counts(self.case_counts, epoch))
        # Trial.report refuses multi-objective studies; the storage still keeps the curve,
        # which is what optuna-dashboard draws and the schedule and pruner compare.
        value = scores.value(self.metric)
        trial.storage.set_trial_intermediate_value(trial._trial_id, epoch, value)
        self.curve[epoch] = value
