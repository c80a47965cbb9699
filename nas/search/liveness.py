"""Trials that no live worker owns: find them, fail them with a reason, and run them again.

Every worker records `worker` = "HOST:PID" on the trial it runs. A RUNNING trial whose worker
is a dead process of this host is an orphan at once; one from another host is an orphan when
its heartbeat goes stale: Optuna's own heartbeat on SQLite, PostgreSQL and MySQL, and on a
journal file or a storage proxy (which have no heartbeats in Optuna 5) the `heartbeat_at`
time that `TrialHeartbeat` records on the trial. An orphan is marked FAIL and enqueued
again, at most `retries` times along one chain of retries, so a killed worker loses no trial
and a search never ends with a dead trial counted as running.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import GrpcStorageProxy, JournalStorage, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from nas.core.staging import process_alive
from nas.search.record import TrialRecord, attr_name, carried, without_owner, write
from nas.search.schedule.continuation import lineage_attrs
from nas.search.storage import HeartbeatConfig


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner(trial: FrozenTrial) -> tuple[str, int] | None:
    host, _, pid = str(TrialRecord.of(trial).worker or "").rpartition(":")
    return (host, int(pid)) if host and pid.isdigit() else None


def owner_state(trial: FrozenTrial) -> str:
    """ "alive" or "dead" for a worker of this host; "unknown" for another host's, or for a
    trial that has not yet recorded its worker."""
    owner = _owner(trial)
    if owner is None or owner[0] != socket.gethostname():
        return "unknown"
    if owner[1] == os.getpid():
        return "alive"
    return "alive" if process_alive(owner[1]) else "dead"


def needs_trial_heartbeat(study: optuna.Study) -> bool:
    """Whether the study's storage lacks Optuna's heartbeat, so nas records one on the trial."""
    return isinstance(study._storage, JournalStorage | GrpcStorageProxy)


class TrialHeartbeat:
    """While a trial runs on a storage without Optuna's heartbeat, record the time on it
    every `interval` s."""

    def __init__(self, trial: optuna.Trial, interval: float) -> None:
        self._trial, self._interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="nas-heartbeat")

    def _beat(self) -> None:
        while True:
            try:
                write(self._trial, heartbeat_at=time.time())
            except UpdateFinishedTrialError:
                return
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> TrialHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _heartbeat_stale(trial: FrozenTrial, grace_period: float, now: float) -> bool:
    last = TrialRecord.of(trial).heartbeat_at
    if last is None:
        last = trial.datetime_start.timestamp() if trial.datetime_start else now
    return now - float(last) > grace_period


def _retry_depth(trial: FrozenTrial, by_number: dict[int, FrozenTrial]) -> int:
    """How many retries came before `trial` along its chain."""
    depth, current = 0, trial
    while True:
        source = current.system_attrs.get("failed_trial", TrialRecord.of(current).retry_of)
        if source is None or int(source) not in by_number:
            return depth
        depth, current = depth + 1, by_number[int(source)]


def fail_and_retry(
    study: optuna.Study, trial: FrozenTrial, reason: str, retries: int, by_number: dict
) -> bool:
    """Mark a RUNNING trial FAIL with `reason` and enqueue it again (within `retries`).
    False when another process settled it first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, attr_name("fail_reason"), reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    if _retry_depth(trial, by_number) >= retries:
        return True
    callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    if callback is not None:  # Optuna's retry: the same record as a heartbeat failure
        # The rerun copies the user attrs: not the dead worker's name, or its rerun would
        # look orphaned until it records its own.
        callback(study, without_owner(trial))
    else:
        attrs = carried(retry_of=trial.number) | lineage_attrs(trial)
        study.enqueue_trial(trial.params, user_attrs=attrs)
    return True


@dataclass(frozen=True)
class Settled:
    failed: tuple[int, ...]  # orphans just failed (and retried where allowed)
    elsewhere: tuple[FrozenTrial, ...]  # RUNNING with an owner that may be alive elsewhere


def settle_orphans(study: optuna.Study, heartbeat: HeartbeatConfig) -> Settled:
    """Fail (and retry) every RUNNING trial whose worker is known to be gone; report the
    RUNNING trials of other hosts whose heartbeat is still fresh."""
    with warnings.catch_warnings():  # marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)  # Optuna's heartbeat, where the storage has one
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    failed, elsewhere = [], []
    now = time.time()
    own_heartbeat = needs_trial_heartbeat(study)
    for trial in trials:
        if trial.state != TrialState.RUNNING:
            continue
        state = owner_state(trial)
        if state == "alive":
            continue
        if state == "dead":
            reason = f"its worker ({TrialRecord.of(trial).worker}) died"
        elif own_heartbeat and _heartbeat_stale(trial, heartbeat.grace_period, now):
            reason = f"its worker sent no heartbeat for {heartbeat.grace_period} s"
        else:
            elsewhere.append(trial)
            continue
        if fail_and_retry(study, trial, reason, heartbeat.retries, by_number):
            failed.append(trial.number)
    return Settled(tuple(failed), tuple(elsewhere))


def describe_waiting(trials: Sequence[FrozenTrial], grace_period: int) -> str:
    numbers = ", ".join(str(t.number) for t in trials)
    return (
        f"waiting for running trial(s) {numbers} of other workers to finish, or to be failed "
        f"and retried once silent for {grace_period} s"
    )
