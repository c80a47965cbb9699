"""Search vs hand-designed networks: is a search worth its budget?

On a real MRI task, Dataset902_MNIWM (white matter on disjoint coronal slabs of the MNI152
template, each with its own bias field, gamma and noise; 10 training cases, 3 held out in
imagesTs/labelsTs; 2D networks slice along axis 1), on this machine, one arm after another,
for a budget of B seconds and each seed S:
  (a) search: `python -m nas.run` with search_spaces/unet.yaml's search, train and study
      sections and the MNI data, `--timeout B --seed S`; nas's own split of the training
      cases (unet.yaml's n_folds and fold, `data.split_seed` = S, so the seed draws the
      validation cases, as a user's run with split_seed S would; the dataset's
      splits_final.json is not used); its Pareto front, chosen on validation, scored on the
      held-out cases (nas.evaluation.heldout), and the member `nas export --best` would export (the
      one-standard-error rule, nas.search.choice.one_standard_error);
  (b) hand networks trained by nas's own trainer with the search's protocol (same cases,
      split, patch and batch plan, augmentation, loss, schedule; the searched learning rate
      at the geometric middle of its range), each for B/4 and for B seconds: an nnU-Net-like
      2D plan (6 stages, 32 to 512 channels, instance norm, leaky ReLU, 2 convolutions of 3 per
      stage, about 20.6 M parameters) and a small plain U-Net (4 stages from 8 channels,
      growth 2, about 121 k parameters); scored on the held-out cases by the same function.

Targets, each checked per seed, holding when it holds for a majority of seeds:
  (1) the front dominates every hand network trained for B/4: for each, some front member
      has at least its held-out IoU with at most its parameters;
  (2) regret: the member `nas export --best` picks has a held-out IoU at most 0.02 below the
      best hand network trained for B (the regret; its median over seeds is printed too),
      and at least 0.03 above the nnU-Net-like plan trained for B;
  (3) the front has at least 3 members spanning at least 1.5 decades of parameters, none
      marked `undertrained` in pareto.csv (fewer than a quarter of the steps of the
      longest-trained member within a factor of ten in parameters);
  (4) training share: at least 0.80 of the search's wall time is spent in training steps
      (benchmarks/training_share.py's count over the study's trials).
Beside them, per seed: the front (params, steps, validation IoU with its standard error over
the validation cases, whole-volume validation IoU, held-out IoU, undertrained, the member
export --best chose), the Spearman correlation of the front's validation and held-out IoU,
the hypervolume over time, the held-out front's hypervolume (held-out IoU vs log10 params in
[2, 8]) and, as information, the smallest member within 0.01 of the front's best held-out IoU
as a fraction of the nnU-Net-like plan's parameters.

Hand results are cached in benchmarks/search_vs_hand_cache.json per arm, seed, budget, code
version (a hash of the trainer, builder, evaluation, loss, data, patch-plan and scoring code),
configs, dataset, validation cases (they follow the seed) and machine, so a rerun redoes only
the search.

    python benchmarks/search_vs_hand.py [--dataset data/Dataset902_MNIWM]
        [--budget-seconds 960] [--seeds 0 1 2] [--workdir DIR] [--cache FILE]
        [--only-search | --only-hand] [--device auto]

Build the dataset first (see /work/shared/data/make_mni_wm.py, or its docstring):
    pip download --no-deps nilearn -d data/nilearn_whl
    (cd data/nilearn_whl && unzip -q -o nilearn-*.whl 'nilearn/datasets/data/*')
    python make_mni_wm.py --nilearn-data data/nilearn_whl/nilearn/datasets/data \\
        --out data/Dataset902_MNIWM
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
import yaml
from optuna.trial import TrialState
from scipy.stats import spearmanr

from nas.data import Case, Dataset, load_dataset, split_dataset
from nas.data.test_split import TestSplit, find_test_split
from nas.evaluation.heldout import score_model, score_trials
from nas.network.builder import UNetConfig, count_parameters
from nas.network.device import pick_device
from nas.network.model_card import Inference, ModelCard, describe_data
from nas.search.choice import one_standard_error
from nas.search.record import TrialRecord
from nas.search.report_figures import hypervolume, normalised_size
from nas.search.results import pareto_front, write_results
from nas.search.space import SearchSpace
from nas.search.space_file import load_space
from nas.search.space_spec import AUTO, CategoricalSpec, FloatSpec, IntSpec
from nas.training.fit import CandidateFailed, TrainConfig, fit, init_model

try:  # run as a module from the repository root
    from benchmarks.training_share import training_seconds
except ImportError:  # run as a script: benchmarks/ is not a package on sys.path
    _spec = importlib.util.spec_from_file_location(
        "training_share", Path(__file__).with_name("training_share.py")
    )
    assert _spec is not None and _spec.loader is not None
    _training_share = importlib.util.module_from_spec(_spec)
    sys.modules["training_share"] = _training_share
    _spec.loader.exec_module(_training_share)
    training_seconds = _training_share.training_seconds

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(__file__).with_name("search_vs_hand_cache.json")
STUDY_NAME = "mniwm"
# The code a hand network's result depends on: a change to any of it reruns the hand arms.
CODE_FILES = (
    "nas/training/fit.py", "nas/training/start.py", "nas/training/losses.py",
    "nas/training/batches.py", "nas/training/train_config.py", "nas/network/builder.py",
    "nas/network/device.py", "nas/network/precision.py", "nas/network/windows.py",
    "nas/network/inference.py", "nas/network/state_dict.py", "nas/network/model_card.py",
    "nas/network/unet_config.py", "nas/validation/validate.py", "nas/validation/metrics.py",
    "nas/search/patch_plan.py", "nas/evaluation/heldout.py", "nas/deploy/predict.py",
    "nas/deploy/exported.py",
)  # fmt: skip
HAND_NETWORKS = {
    "nnU-Net-like 2D": UNetConfig(
        spatial_dims=2,
        depth=6,
        base_channels=32,
        channel_growth=2.0,
        max_channels=512,
        kernel_size=3,
        convs_per_stage=2,
        norm="instance",
        activation="leaky_relu",
    ),
    "small U-Net": UNetConfig(spatial_dims=2, depth=4, base_channels=8, channel_growth=2.0),
}
NNUNET_LIKE = "nnU-Net-like 2D"
MAX_REGRET = 0.02  # target (2): how far below the best hand network trained for B
ABOVE_NNUNET = 0.03  # target (2): how far above the nnU-Net-like plan trained for B
MIN_MEMBERS, MIN_DECADES = 3, 1.5  # target (3)
MIN_TRAINING_SHARE = 0.80  # target (4)
TOLERANCE = 1e-9  # floating-point slack in the comparisons of target (2)
WITHIN_BEST = 0.01  # information: the smallest front member this close to the front's best
HYPERVOLUME_BOUNDS = (2.0, 8.0)  # log10 params: 100 to 100 M, the same for every seed
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SPECS = (IntSpec, FloatSpec, CategoricalSpec)


@dataclasses.dataclass(frozen=True)
class Point:
    """One network of an arm: its size and scores (None where training failed)."""

    arm: str
    n_params: int
    val_iou: float | None
    test_iou: float | None
    steps: int | None = None  # optimiser steps trained (front members)
    undertrained: bool = False  # pareto.csv's mark
    number: int | None = None  # the trial (front members)
    val_se: float | None = None  # the validation IoU's standard error over validation cases
    volume_val_iou: float | None = None  # IoU of the whole validation volumes
    chosen: bool = False  # the member `nas export --best` picks


@dataclasses.dataclass(frozen=True)
class Task:
    """The data every arm of one seed works on: the same cases, split and test split."""

    space: SearchSpace
    dataset: Dataset
    train_cases: list[Case]
    val_cases: list[Case]
    split: TestSplit
    version: str  # of dataset.json and manifest.json


def load_task(space_path: Path) -> Task:
    space = load_space(space_path)
    dataset = load_dataset(space.data)  # preprocessed once, outside every arm's budget
    train_cases, val_cases = split_dataset(dataset, space.data)
    split = find_test_split(space.data, dataset)
    if split is None:
        raise SystemExit(f"{space.data.path} has no imagesTs/ + labelsTs/ to score on")
    digest = hashlib.sha256()
    for name in ("dataset.json", "manifest.json"):
        if (dataset.root / name).is_file():
            digest.update((dataset.root / name).read_bytes())
    return Task(space, dataset, train_cases, val_cases, split, digest.hexdigest()[:16])


# --- the search arm --------------------------------------------------------------------


def write_space(dataset: Path, path: Path, seed: int) -> Path:
    """search_spaces/unet.yaml with the MNI data in place of its data section: nas's own
    folds (unet.yaml's n_folds and fold), drawn by `seed`; never the dataset's splits file."""
    space = yaml.safe_load((ROOT / "search_spaces" / "unet.yaml").read_text())
    folds = {k: v for k, v in space.get("data", {}).items() if k in ("n_folds", "fold")}
    space["data"] = {"path": str(dataset), "slice_axis": 1, **folds, "split_seed": seed}
    space["study"] = {**space.get("study", {}), "name": STUDY_NAME}
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def run_search(space_path: Path, results: Path, budget: float, seed: int) -> float:
    """A fresh search of `budget` seconds; its wall-clock seconds (it may overrun a little)."""
    shutil.rmtree(results, ignore_errors=True)  # a new study, not a continued one
    results.mkdir(parents=True)
    command = [
        sys.executable, "-m", "nas.run", str(space_path), "--timeout", str(budget),
        "--seed", str(seed), "--results-dir", str(results),
    ]  # fmt: skip
    start = time.perf_counter()
    with open(results / "run.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (results / "run.log").read_text().splitlines()[-5:]
        raise SystemExit(f"the search failed ({done.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - start


def front_points(task: Task, results: Path, device: torch.device) -> list[Point]:
    """The front from pareto.csv, with held-out scores (where nas.run did not score them, a
    version without nas.evaluation.heldout wired in, they are scored here from the checkpoints),
    each member's standard error and the member `nas export --best` picks marked `chosen`."""
    study_dir = results / STUDY_NAME
    study = _study(study_dir)
    pareto = pd.read_csv(study_dir / "pareto.csv")
    if pareto.empty:
        return []
    if "test_iou" not in pareto or pareto.test_iou.isna().any():
        score_trials(study, study_dir, pareto_front(study), task.split, device)
        write_results(study, study_dir)
        pareto = pd.read_csv(study_dir / "pareto.csv")
    _, chosen, intervals = one_standard_error(study)
    points = []
    for row in pareto.itertuples():
        number = int(row.number)
        known = intervals.get(number)
        steps = _float(getattr(row, "fidelity_steps", None))
        points.append(
            Point(
                "search front",
                int(row.n_params),
                float(row.val_iou),
                _float(row.test_iou),
                steps=int(steps) if steps is not None else None,
                undertrained=bool(getattr(row, "undertrained", False)),
                number=number,
                val_se=float(known.se) if known is not None else None,
                volume_val_iou=_float(getattr(row, "volume_val_iou", None)),
                chosen=number == chosen,
            )
        )
    return points


def training_share(results: Path, wall_seconds: float) -> float:
    """Seconds in training steps over every trial's own epochs, over the search's wall time."""
    trials = _study(results / STUDY_NAME).get_trials(deepcopy=False)
    return training_seconds(trials) / wall_seconds if wall_seconds > 0 else 0.0


def held_out_hypervolume(front: list[Point]) -> float:
    """Hypervolume of the front's held-out IoU against log10 params in HYPERVOLUME_BOUNDS."""
    return hypervolume(
        [
            (p.test_iou, normalised_size(p.n_params, HYPERVOLUME_BOUNDS))
            for p in front
            if p.test_iou is not None
        ]
    )


def rank_correlation(front: list[Point]) -> float | None:
    """Spearman's correlation of the front's validation and held-out IoU (None below 3
    members with both, or where either is constant)."""
    both = [
        (p.val_iou, p.test_iou) for p in front if p.val_iou is not None and p.test_iou is not None
    ]
    if len(both) < 3:
        return None
    rho = float(spearmanr([v for v, _ in both], [t for _, t in both]).statistic)
    return None if math.isnan(rho) else rho


def _study(study_dir: Path) -> optuna.Study:
    storage = f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name=STUDY_NAME, storage=storage)


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _float(value: Any) -> float | None:
    """A number read from pareto.csv as a float; None where it is missing or NaN."""
    value = _number(value)
    return None if value is None else float(value)


def hypervolume_over_time(results: Path, budget: float) -> list[float]:
    """Hypervolume (validation IoU vs log10 params in HYPERVOLUME_BOUNDS) of the trials
    completed by each fraction of the budget, and at the end (a trial may finish after B)."""
    study = _study(results / STUDY_NAME)
    trials = study.get_trials(deepcopy=False)
    if not trials:
        return [0.0 for _ in (*FRACTIONS, None)]
    start = min(t.datetime_start for t in trials if t.datetime_start is not None)
    done = [
        ((t.datetime_complete - start).total_seconds(), r.iou, r.n_params)
        for t in trials
        if t.state == TrialState.COMPLETE
        for r in [TrialRecord.of(t)]
    ]
    return [
        hypervolume(
            [
                (iou, normalised_size(n, HYPERVOLUME_BOUNDS))
                for s, iou, n in done
                if f is None or s <= f * budget
            ]
        )
        for f in (*FRACTIONS, None)
    ]


# --- the hand arms ---------------------------------------------------------------------


def _middle(entry: Any) -> Any:
    """A searched train entry fixed at the middle of its range (geometric for log ranges);
    a fixed one as it is. Of several specs (each with a `when`), the 2D one."""
    is_searched = isinstance(entry, tuple) and entry and isinstance(entry[0], SPECS)
    if not is_searched:
        return entry
    spec = next((s for s in entry if (s.when or {}).get("spatial_dims") in (None, 2)), entry[0])
    if hasattr(spec, "choices"):
        return spec.choices[0]
    middle = math.sqrt(spec.low * spec.high) if spec.log else (spec.low + spec.high) / 2
    return round(middle) if isinstance(spec.low, int) else middle


def hand_train_config(task: Task, device: torch.device, seconds: float, seed: int) -> TrainConfig:
    """The search's training protocol, with only time as the limit."""
    space = task.space
    if AUTO in space.train.values():  # the sizes the search plans for itself
        from nas.search.patch_plan import plan_patches

        space = plan_patches(space, task.dataset, device).apply(space)
    fields = {name: _middle(entry) for name, entry in space.train.items()}
    fields |= {"epochs": 100_000, "max_seconds": seconds, "seed": seed}
    return TrainConfig(**fields)


def code_version() -> str:
    digest = hashlib.sha256()
    files = [ROOT / f for f in CODE_FILES] + sorted((ROOT / "nas" / "data").glob("*.py"))
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return f"{device.type}:{name or platform.machine()}:{os.cpu_count()} cpus"


def train_hand(
    name: str, unet: UNetConfig, cfg: TrainConfig, task: Task, device: torch.device
) -> dict[str, Any]:
    """Train one hand network as `cfg` says and score it on the held-out cases."""
    model = init_model(unet, cfg.seed)
    record = {"arm": name, "n_params": count_parameters(model), "val_iou": None, "test_iou": None}
    try:
        result = fit(model, task.train_cases, task.val_cases, task.dataset.scheme, cfg, device,
                     slicing=task.space.data.slicing)  # fmt: skip
    except CandidateFailed as err:
        return record | {"fail_reason": err.reason}
    data = describe_data(task.dataset)
    card = ModelCard(
        architecture=unet.to_dict(),
        preprocessing=data["preprocessing"],
        inference=Inference(
            spatial_dims=2,
            slice_axis=task.space.data.slice_axis,
            patch_size=cfg.patch_size_2d,
            size_multiple=model.size_multiple,
            output="sigmoid" if unet.out_channels == 1 else "softmax",
        ),
        labels=data["labels"],
        source={"benchmark": "search_vs_hand", "arm": name, "seed": cfg.seed},
    )
    scores = score_model(model, card, task.split, device)
    return record | {
        "val_iou": result.scores.iou,
        "test_iou": scores.iou,
        "test_dice": scores.dice,
        "epochs": len(result.history),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
    }


def hand_points(
    task: Task, budget: float, seed: int, device: torch.device, cache_path: Path, train: bool
) -> dict[str, Point]:
    """Every hand network for B/4 and B seconds: from the cache where it holds them, else
    trained now (with `train`) and added to it."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    points = {}
    for name, unet in HAND_NETWORKS.items():
        unet = dataclasses.replace(
            unet,
            in_channels=task.dataset.in_channels,
            out_channels=task.dataset.scheme.out_channels,
        )
        for share, label in ((0.25, "B/4"), (1.0, "B")):
            cfg = hand_train_config(task, device, budget * share, seed)
            key_fields = {
                "arm": name, "budget_seconds": budget, "code": code_version(),
                "unet": unet.to_dict(), "train": dataclasses.asdict(cfg),
                "data": task.version, "machine": machine(device),
                "val_cases": sorted(c.name for c in task.val_cases),
            }  # fmt: skip
            key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
            if key not in cache:
                if not train:
                    continue
                print(f"  training {name} for {cfg.max_seconds:g} s (seed {seed})", flush=True)
                cache[key] = {"key": key_fields, **train_hand(name, unet, cfg, task, device)}
                done = cache[key]
                print(f"    {done.get('steps', 0)} steps in {done.get('seconds', '?')} s, val IoU "
                      f"{_fmt(done['val_iou'])}, held-out IoU {_fmt(done['test_iou'])}"
                      + (f" ({done['fail_reason']})" if "fail_reason" in done else ""))  # fmt: skip
                cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            entry = cache[key]
            points[f"{name}, {label}"] = Point(
                f"{name}, {label}", entry["n_params"], entry["val_iou"], entry["test_iou"]
            )
    return points


# --- the comparison --------------------------------------------------------------------


def chosen_point(front: list[Point]) -> Point | None:
    """The member `nas export --best` picks."""
    return next((p for p in front if p.chosen), None)


def best_hand(hand: dict[str, Point]) -> float:
    """The best held-out IoU of the hand networks trained for B (a failed one scores 0)."""
    return max((p.test_iou or 0.0) for name, p in hand.items() if name.endswith(", B"))


def regret(front: list[Point], hand: dict[str, Point]) -> float | None:
    """How far the export --best member's held-out IoU is below the best hand network
    trained for B (negative: above it); None where that member has no held-out score."""
    chosen = chosen_point(front)
    if chosen is None or chosen.test_iou is None:
        return None
    return best_hand(hand) - chosen.test_iou


def targets(front: list[Point], hand: dict[str, Point], share: float) -> dict[str, bool]:
    """Whether each target holds for one seed (a failed hand network scores 0)."""
    scored = [p for p in front if p.test_iou is not None]
    quarter = [p for name, p in hand.items() if name.endswith("B/4")]
    nnunet = hand[f"{NNUNET_LIKE}, B"].test_iou or 0.0
    chosen = chosen_point(front)
    chosen_iou = chosen.test_iou if chosen is not None and chosen.test_iou is not None else -1.0
    lost = regret(front, hand)

    def dominated(hand_point: Point) -> bool:
        return any(
            p.test_iou >= (hand_point.test_iou or 0.0) and p.n_params <= hand_point.n_params
            for p in scored
        )

    sizes = [p.n_params for p in front]
    decades = math.log10(max(sizes) / min(sizes)) if sizes else 0.0
    return {
        "(1) the front dominates every hand network trained for B/4": all(map(dominated, quarter)),
        f"(2) the export --best member's held-out IoU is <= {MAX_REGRET} below the best hand "
        f"network trained for B and >= {ABOVE_NNUNET} above the nnU-Net-like plan's": (
            lost is not None
            and lost <= MAX_REGRET + TOLERANCE
            and chosen_iou >= nnunet + ABOVE_NNUNET - TOLERANCE
        ),
        f"(3) the front has >= {MIN_MEMBERS} members spanning >= {MIN_DECADES:g} decades, "
        "none undertrained": (
            len(front) >= MIN_MEMBERS
            and decades >= MIN_DECADES
            and not any(p.undertrained for p in front)
        ),
        f"(4) training share >= {MIN_TRAINING_SHARE:.2f} of the search's wall time": (
            share >= MIN_TRAINING_SHARE
        ),
    }


def front_rows(front: list[Point]) -> dict[str, Point]:
    """The front members worth a row: the user's pick (export --best), the best validation,
    the best held-out, and the smallest within WITHIN_BEST of that."""
    scored = [p for p in front if p.test_iou is not None]
    if not scored:
        return {}
    best = max(scored, key=lambda p: p.test_iou)
    close = min(
        (p for p in scored if p.test_iou >= best.test_iou - WITHIN_BEST), key=lambda p: p.n_params
    )
    rows = {}
    chosen = chosen_point(front)
    if chosen is not None:
        rows["front: export --best"] = chosen
    return rows | {
        "front: best validation": max(scored, key=lambda p: (p.val_iou, -p.n_params)),
        "front: best held-out": best,
        f"front: smallest within {WITHIN_BEST}": close,
    }


def print_front(front: list[Point]) -> None:
    for p in front:
        se = f" +- {p.val_se:.4f}" if p.val_se is not None else "         "
        marks = ("  undertrained" if p.undertrained else "") + (
            "  <- export --best" if p.chosen else ""
        )
        print(f"    trial {p.number if p.number is not None else '-':>4}  {p.n_params:>11,} params"
              f"  steps {p.steps if p.steps is not None else '-':>6}  val IoU {_fmt(p.val_iou)}"
              f"{se}  volume val {_fmt(p.volume_val_iou)}  held-out {_fmt(p.test_iou)}"
              f"{marks}")  # fmt: skip


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:.4f}"


def print_table(rows: dict[str, dict[int, Point]], seeds: list[int]) -> None:
    width = max(len(name) for name in rows) + 2
    seed_heads = "".join(f"  s{s} params    s{s} held-out  s{s} val" for s in seeds)
    print(f"{'arm':<{width}}{seed_heads}  | median params  held-out  val IoU")
    for name, by_seed in rows.items():
        line = f"{name:<{width}}"
        for seed in seeds:
            p = by_seed.get(seed)
            line += (
                f"  {p.n_params:>11,}  {_fmt(p.test_iou)}    {_fmt(p.val_iou)}" if p else " " * 34
            )
        points = list(by_seed.values())
        line += (
            f"  | {statistics.median(p.n_params for p in points):>13,.0f}"
            f"  {_fmt(_median([p.test_iou for p in points]))}"
            f"    {_fmt(_median([p.val_iou for p in points]))}"
        )
        print(line)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def search_seed(
    task: Task, workdir: Path, budget: float, seed: int, device: torch.device
) -> tuple[list[Point], float]:
    """Run one seed's search and print what it found; its front and training share."""
    results = workdir / f"seed{seed}_b{budget:g}"
    print(f"  searching for {budget:g} s (seed {seed})", flush=True)
    seconds = run_search(workdir / f"space_seed{seed}.yaml", results, budget, seed)
    front = front_points(task, results, device)
    share = training_share(results, seconds)
    curve = hypervolume_over_time(results, budget)
    shares = ", ".join(f"{f:.0%} {h:.3f}" for f, h in zip(FRACTIONS, curve, strict=False))
    shares += f", end {curve[-1]:.3f}"
    print(f"  seed {seed}: the search took {seconds:.0f} s, {share:.2f} of it in training "
          f"steps; front of {len(front)}; hypervolume by share of B: {shares}; held-out "
          f"front's hypervolume {held_out_hypervolume(front):.3f}")  # fmt: skip
    print_front(front)
    rho = rank_correlation(front)
    print(f"    Spearman of the front's validation and held-out IoU: "
          f"{'-' if rho is None else f'{rho:.3f}'}")  # fmt: skip
    return front, share


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "data" / "Dataset902_MNIWM")
    parser.add_argument("--budget-seconds", type=float, default=960.0, help="B")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=ROOT / "results" / "search_vs_hand")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="hand results")
    parser.add_argument("--device", default="auto")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only-search", action="store_true", help="hand results from the cache")
    only.add_argument("--only-hand", action="store_true", help="no search (and no targets)")
    args = parser.parse_args()
    dataset = args.dataset.resolve()
    if not (dataset / "imagesTs").is_dir():
        print(f"{dataset}: not found, or without imagesTs/; build it as the docstring says",
              file=sys.stderr)  # fmt: skip
        return 2
    budget = args.budget_seconds
    device = pick_device(args.device)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"B = {budget:g} s on {machine(device)}; seeds {args.seeds}; code {code_version()}")

    rows: dict[str, dict[int, Point]] = {}
    verdicts: dict[str, list[bool]] = {}
    regrets: dict[int, float] = {}
    for seed in args.seeds:
        task = load_task(write_space(dataset, workdir / f"space_seed{seed}.yaml", seed))
        print(f"seed {seed}: validation cases {', '.join(sorted(c.name for c in task.val_cases))}")
        hand = hand_points(task, budget, seed, device, args.cache, train=not args.only_search)
        front: list[Point] = []
        share = 0.0
        if not args.only_hand:
            front, share = search_seed(task, workdir, budget, seed, device)
        complete = front and len(hand) == 2 * len(HAND_NETWORKS)
        if complete:
            lost = regret(front, hand)
            if lost is not None:
                regrets[seed] = lost
            nnunet = hand[f"{NNUNET_LIKE}, B"]
            close = front_rows(front).get(f"front: smallest within {WITHIN_BEST}")
            print(f"    regret of the export --best member: "
                  f"{'-' if lost is None else f'{lost:+.4f}'} (the best hand network trained "
                  f"for B: {best_hand(hand):.4f})" + (
                      f"; smallest member within {WITHIN_BEST} of the front's best held-out: "
                      f"{close.n_params:,} params, 1/{nnunet.n_params / close.n_params:.0f} of "
                      f"the nnU-Net-like plan's" if close is not None else ""))  # fmt: skip
        for name, point in {**front_rows(front), **hand}.items():
            rows.setdefault(name, {})[seed] = point
        if complete:
            for target, holds in targets(front, hand, share).items():
                verdicts.setdefault(target, []).append(holds)

    print()
    if regrets:
        by_seed = ", ".join(f"s{s} {r:+.4f}" for s, r in regrets.items())
        print(f"regret of the export --best member (the best hand network trained for B minus "
              f"it): median {statistics.median(regrets.values()):+.4f} ({by_seed})")  # fmt: skip
        print()
    if rows:
        print_table(rows, args.seeds)
    if verdicts:
        print()
        for target, per_seed in verdicts.items():
            held = sum(per_seed)
            verdict = "HOLDS" if held * 2 > len(per_seed) else "FAILS"
            print(f"{target}: {verdict} ({held} of {len(per_seed)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
