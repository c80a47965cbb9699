"""What a search would do, without a study: `nas.run SPACE --dry-run`.

Everything a search checks before its first trial has been checked by the time this runs
(space, data, the preprocessing cache, the patch plan). It then draws one candidate (the
first of `study.enqueue`, else a random draw) from a throwaway in-memory study, builds it,
counts its parameters and MACs, and times a few training steps on the real batches, and one
validation on the search's validation patches, so that the printed plan says what one step
of the search costs on this machine and what share of it validation takes. Whole volumes are
priced the same way: one forward pass of a batch of windows, timed, times the windows a whole
case needs at the planned patch sizes, projects what scoring the front takes after the search.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import optuna
import torch

from nas.data import Case, Slicing
from nas.data.labels import LabelScheme
from nas.network.builder import count_parameters
from nas.network.describe import count_macs, summary
from nas.network.device import prepare_model
from nas.network.precision import autocast
from nas.network.windows import DEFAULT_OVERLAP, window_count, windows_per_batch
from nas.search.candidate import Candidate
from nas.search.draw import sample, warm_start_params
from nas.search.measure import synchronise
from nas.search.run_setup import RunSetup, plan_line
from nas.search.schedule.pruner import validation_every
from nas.search.scoring import decision_epochs, search_validation_cases
from nas.search.space import SearchSpace, possible_values
from nas.training.batches import training_batches
from nas.training.fit import (
    device_batch,
    init_model,
    make_optimizer,
    train_step,
)
from nas.training.losses import make_loss
from nas.validation.validate import ValidationPatches, evaluate_patches

TIMED_STEPS = 3  # after one warm-up step


def sample_candidate(space: SearchSpace, in_channels: int, out_channels: int) -> Candidate:
    """The candidate a new study would train first."""
    sampler = optuna.samplers.RandomSampler(seed=space.study.seed)
    study = optuna.create_study(sampler=sampler)
    if space.study.enqueue:
        study.enqueue_trial(warm_start_params(space, space.study.enqueue[0]))
    return sample(space, study.ask(), in_channels, out_channels, space.study.seed)


def seconds_per_step(
    candidate: Candidate,
    cases: Sequence[Case],
    scheme: LabelScheme,
    slicing: Slicing,
    device: torch.device,
) -> float:
    """The median time of a training step of `candidate` on batches of `cases`."""
    unet, train = candidate.unet, candidate.train
    model = prepare_model(init_model(unet, train.seed), unet.spatial_dims, device)
    batches = training_batches(cases, train, unet.spatial_dims, train.seed, slicing, device, 0)
    optimizer = make_optimizer(model, train)
    loss = make_loss(scheme)
    times = []
    for _ in range(1 + TIMED_STEPS):
        images, labels = device_batch(next(batches), device)
        start = time.perf_counter()
        float(train_step(model, optimizer, loss, images, labels))
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def validation_share(
    candidate: Candidate,
    val_cases: Sequence[Case],
    scheme: LabelScheme,
    space: SearchSpace,
    rungs: Sequence[int],
    step_seconds: float,
    device: torch.device,
) -> str:
    """What validating the search's way costs a candidate trained through every rung: one
    validation timed on the validation patches, times the validations its segments make."""
    cfg = space.study.validation
    every = validation_every(cfg.every, space.study.pruner)
    ends = [0, *rungs]
    count = sum(len(decision_epochs(a, b, every)) for a, b in zip(ends, ends[1:], strict=False))
    cases = search_validation_cases(val_cases, cfg.cases, space.study.seed)
    patches = ValidationPatches(cases, cfg.patches_per_case, space.study.seed,
                                space.data.slicing.axis, cfg.foreground_fraction)  # fmt: skip
    unet, train = candidate.unet, candidate.train
    model = prepare_model(init_model(unet, train.seed), unet.spatial_dims, device)
    window = train.patch_size(unet.spatial_dims)
    evaluate_patches(model, patches, scheme, window, device)  # warm-up
    start = time.perf_counter()
    evaluate_patches(model, patches, scheme, window, device)
    one = time.perf_counter() - start
    steps = rungs[-1] * train.batches_per_epoch
    share = count * one / (count * one + steps * step_seconds)
    return (
        f"validation: {len(patches)} patches ({cfg.patches_per_case} per case) in "
        f"{one * 1000:.0f} ms, {count} times to the top rung ({rungs[-1]} epochs, "
        f"{steps:,} steps): projected {share:.0%} of a candidate's time"
    )


def describe_candidate(
    candidate: Candidate,
    in_channels: int,
    cases: Sequence[Case],
    scheme: LabelScheme,
    slicing: Slicing,
    device: torch.device,
) -> tuple[str, float]:
    """The candidate in a line, and its measured seconds per training step."""
    unet, train = candidate.unet, candidate.train
    window = train.patch_size(unet.spatial_dims)
    model = init_model(unet, train.seed)
    n_params = count_parameters(model)
    macs = count_macs(model, in_channels, window)
    step = seconds_per_step(candidate, cases, scheme, slicing, device)
    line = (
        f"first candidate: {summary(unet, n_params)}; {n_params:,} params, "
        f"{macs / 1e9:.2f} GMACs per {'x'.join(map(str, window))} window; "
        f"one training step {step * 1000:.0f} ms on {device}"
    )
    return line, step


def seconds_per_window(candidate: Candidate, in_channels: int, device: torch.device) -> float:
    """A window's share of one forward pass of `candidate` over `windows_per_batch` windows,
    run as whole cases are predicted (eval mode, no gradients, mixed precision on CUDA),
    timed after one pass to warm up."""
    unet, train = candidate.unet, candidate.train
    model = prepare_model(init_model(unet, train.seed), unet.spatial_dims, device).eval()
    generator = torch.Generator().manual_seed(train.seed)
    window = train.patch_size(unet.spatial_dims)
    batch = windows_per_batch(unet.spatial_dims, device)
    windows = torch.randn(batch, in_channels, *window, generator=generator)
    windows = windows.to(device)
    with torch.no_grad(), autocast(device):
        model(windows)
        synchronise(device)
        start = time.perf_counter()
        model(windows)
        synchronise(device)
    return (time.perf_counter() - start) / batch


def _seconds(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def whole_volume_lines(
    candidate: Candidate,
    space: SearchSpace,
    in_channels: int,
    val_cases: Sequence[Case],
    n_test: int,
    device: torch.device,
) -> list[str]:
    """What predicting whole cases costs: the windows a validation case needs, on average,
    for each kind of network the space draws, at the planned patch sizes; and the seconds
    `candidate` takes for one case, for a front member's whole validation volumes (scored
    after the search) and for its held-out cases (taken to be the size of the validation
    ones). Network time only: reading and resampling the held-out scans come on top."""
    train = candidate.train
    mean = {
        dims: sum(window_count(c.image.shape[1:], train.patch_size(dims), space.data.slice_axis)
                  for c in val_cases) / len(val_cases)
        for dims in possible_values(space, "spatial_dims") | {candidate.unet.spatial_dims}
    }  # fmt: skip

    def windows(dims: int) -> str:
        plural = "s" if round(mean[dims]) != 1 else ""
        return f"{mean[dims]:,.0f} window{plural} of {'x'.join(map(str, train.patch_size(dims)))}"

    dims = candidate.unet.spatial_dims
    per_case = mean[dims] * seconds_per_window(candidate, in_channels, device)
    kinds = ", ".join(f"{d}D {windows(d)}" for d in sorted(possible_values(space, "spatial_dims")))
    projection = (
        f"whole-volume pass of the first candidate: ~{_seconds(per_case)} s a case ({dims}D, "
        f"{windows(dims)} on {device}); front scoring ~{_seconds(per_case * len(val_cases))} s "
        f"per member over {len(val_cases)} validation cases"
    )
    if n_test:
        projection += (
            f"; held-out scoring ~{_seconds(per_case * n_test)} s per member over {n_test} cases"
        )
    return [
        f"whole cases: {kinds} (overlap {DEFAULT_OVERLAP:g}; mean of the {len(val_cases)} "
        "validation cases)",
        projection,
    ]


def dry_run(setup: RunSetup) -> int:
    """Print what the search would do; no study, no results folder."""
    space, dataset, test_split = setup.space, setup.dataset, setup.test_split
    train_cases, val_cases = setup.train_cases, setup.val_cases
    data, study = space.data, space.study
    split = f"splits file {data.splits_file}" if data.splits_file else f"{data.n_folds} folds"
    held_out = f", {len(test_split.cases)} held-out" if test_split else ""
    print(f"data {dataset.root}: {len(dataset.cases)} cases, {len(train_cases)} training / "
          f"{len(val_cases)} validation (fold {data.fold} of {split}){held_out}; "
          f"classes {', '.join(dataset.scheme.scored_names)}; cache {dataset.cache}")  # fmt: skip
    print(setup.patch_plan.describe())
    print(f"study {study.name!r}: objectives {', '.join(study.objectives)}, sampler "
          f"{study.sampler}, up to {study.n_trials} trials")  # fmt: skip
    print(plan_line(setup.schedule, space))
    candidate = sample_candidate(space, dataset.in_channels, dataset.scheme.out_channels)
    line, step = describe_candidate(candidate, dataset.in_channels, train_cases, dataset.scheme,
                                    data.slicing, setup.device)  # fmt: skip
    print(line)
    print(validation_share(candidate, val_cases, dataset.scheme, space, setup.schedule.rungs,
                           step, setup.device))  # fmt: skip
    n_test = len(test_split.cases) if test_split else 0
    for line in whole_volume_lines(candidate, space, dataset.in_channels, val_cases, n_test,
                                   setup.device):  # fmt: skip
        print(line)
    print("dry run: no study was created")
    return 0
