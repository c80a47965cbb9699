"""Ensembles across cross-validated members, chosen out of fold, as nnU-Net's
find_best_configuration chooses among configurations and their ensembles.

`nas retrain --folds` trains each chosen member on every fold. Here every validation case of
every fold is predicted by each member's model of that fold, as probabilities on the case's
preprocessed grid (each member with its own patch, 2D or 3D). Each member alone and the
ensembles of the best 2 and the best 3 members (by their cross-validated mean) are scored by
IoU and Dice pooled over all those out-of-fold cases, the same cases for every candidate;
the best is chosen, a smaller ensemble winning a tie (it costs fewer passes). Its
postprocessing is decided out of fold by nnU-Net's rule (a class keeps its largest connected
component where that raises its mean Dice). The rows and the choice are kept on the
cross-validation study (`member_ensembles`), which `nas export --ensemble members` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch

from nas.data import Case, DataConfig, load_dataset, split_dataset
from nas.network.builder import UNetConfig
from nas.network.inference import predictor
from nas.network.state_dict import load_weights
from nas.network.windows import predict_logits
from nas.search.record import StudyRecord, TrialRecord
from nas.search.weights import fold_path
from nas.training.fit import init_model
from nas.validation.postprocess import classes_helped, dice_per_class, keep_largest_component
from nas.validation.validate import PooledCounts

LARGEST_ENSEMBLE = 3


@dataclass(frozen=True)
class Member:
    trial: int
    unet: UNetConfig
    patch_size: tuple[int, ...]
    n_params: int


def _members(search: optuna.Study, numbers: Sequence[int]) -> list[Member]:
    by_number = {t.number: t for t in search.get_trials(deepcopy=False)}
    members = []
    for number in numbers:
        record = TrialRecord.of(by_number[number])
        candidate = record.candidate()
        unet = candidate.unet
        patch = candidate.train.patch_size(unet.spatial_dims)
        members.append(Member(number, unet, tuple(patch), record.n_params or 0))
    return members


def candidate_ensembles(ranked: Sequence[int]) -> list[tuple[int, ...]]:
    """Each member alone, then the best 2, ..., the best LARGEST_ENSEMBLE (`ranked`: trial
    numbers, best cross-validated mean first)."""
    singles = [(number,) for number in ranked]
    return singles + [tuple(ranked[:k]) for k in range(2, min(LARGEST_ENSEMBLE, len(ranked)) + 1)]


@torch.no_grad()
def _fold_probabilities(
    member: Member,
    fold: int,
    cases: Sequence[Case],
    study_dir: Path,
    output: str,
    slice_axis: int,
    device: torch.device,
) -> list[torch.Tensor]:
    model = init_model(member.unet, 0)
    load_weights(model, fold_path(study_dir, member.trial, fold))
    model = model.to(device).eval()
    run = predictor([model], output, member.unet.spatial_dims)
    return [
        predict_logits(run, case.image, member.patch_size, device, slice_axis).cpu()
        for case in cases
    ]


def score_out_of_fold(
    search: optuna.Study,
    ranked: Sequence[int],
    folds: Sequence[int],
    study_dir: Path,
    device: torch.device,
) -> tuple[list[dict], dict]:
    """Rows (one per candidate of `candidate_ensembles(ranked)`: IoU and Dice pooled over the
    out-of-fold cases, without and with the chosen postprocessing) and the chosen row."""
    data = DataConfig(**StudyRecord.of(search).data_config)
    dataset = load_dataset(data)
    scheme = dataset.scheme
    members = {m.trial: m for m in _members(search, ranked)}
    candidates = candidate_ensembles(ranked)
    counts = {c: PooledCounts(scheme) for c in candidates}
    plain: dict[tuple[int, ...], list] = {c: [] for c in candidates}
    largest: dict[tuple[int, ...], list] = {c: [] for c in candidates}
    classes = range(1, dataset.n_classes + 1)
    for fold in folds:
        _, val_cases = split_dataset(dataset, DataConfig(**{**data.to_dict(), "fold": fold}))
        probabilities = {
            number: _fold_probabilities(
                member, fold, val_cases, study_dir, scheme.output, data.slice_axis, device
            )
            for number, member in members.items()
        }
        for i, case in enumerate(val_cases):
            label = np.asarray(case.label)
            for candidate in candidates:
                mean = sum(probabilities[n][i] for n in candidate) / len(candidate)
                predicted = scheme.classes_from_probabilities(mean).numpy()
                counts[candidate].add(predicted, label)
                plain[candidate].append(dice_per_class(predicted, label, dataset.n_classes))
                kept = keep_largest_component(predicted, classes)
                largest[candidate].append(dice_per_class(kept, label, dataset.n_classes))
    rows = []
    for candidate in candidates:
        scores = counts[candidate].scores()
        helped = classes_helped(plain[candidate], largest[candidate])
        rows.append(
            {
                "members": " + ".join(str(n) for n in candidate),
                "n_members": len(candidate),
                "n_params": sum(members[n].n_params for n in candidate),
                "oof_iou": scores.iou,
                "oof_dice": scores.dice,
                "oof_case_dice": float(np.mean(plain[candidate])),
                "oof_case_dice_largest": float(np.mean(largest[candidate])),
                "largest_component": " ".join(dataset.class_names[k - 1] for k in helped),
            }
        )
    chosen = max(rows, key=lambda r: (round(r["oof_iou"], 6), -r["n_members"]))
    return rows, chosen
