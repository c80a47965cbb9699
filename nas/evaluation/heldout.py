"""Held-out test scores: the front's models on test cases that the search never saw; and
the front's whole validation volumes, predicted once per member after the search.

A dataset's test split (nas/data/test_split.py) is `imagesTs/` + `labelsTs/` beside
imagesTr/, or the folder `data.test` names. Each trial is scored through its export: the
folder nas.export writes (without the pt2/ONNX programs), then nas.predict's own path on every
test scan (raw NIfTI, the recorded preprocessing, sliding windows, back to the scan's grid),
so the score is that of the model a user would ship, not of the cached arrays the search
validated on. Test labels map to classes as the training labels do (`data.foreground`); IoU
and Dice are pooled over the test cases per class (or region) and averaged over them, as
validation is. The scores live in the study's user attr "test_scores" with the fingerprints
of the weights and the test files they came from, so a trial is scored again only when one
of them changes. Nothing here is read by the sampler, the pruner or the front: these scores
report, they never select.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from nas.data.layouts import CaseFiles, Scan
from nas.data.preprocess import open_nifti
from nas.data.test_split import TestSplit
from nas.deploy.export import export
from nas.deploy.exported import load_predictor
from nas.deploy.predict import segment_classes
from nas.network.builder import build_unet
from nas.network.inference import Predictor, predictor
from nas.network.model_card import ModelCard, read_card
from nas.search.candidate_state import TrainingData
from nas.search.record import StudyRecord, TrialRecord, merge_study
from nas.search.trial_files import trial_files
from nas.search.weights import checkpoint_path, trial_name
from nas.validation.validate import PooledCounts, Scores, evaluate


def _label_classes(path: Path, class_of_value: dict[int, int]) -> np.ndarray:
    """A test label as class indices, in the file's own voxel order (as predicted masks)."""
    label = np.asanyarray(open_nifti(path).dataobj)
    while label.ndim > 3 and label.shape[-1] == 1:
        label = label[..., 0]
    lookup = np.zeros(max(class_of_value) + 1, np.uint8)
    for value, class_index in class_of_value.items():
        lookup[value] = class_index
    return lookup[label.astype(np.int64)]


def test_cases(
    predictor: Predictor, card: ModelCard, split: TestSplit, device: torch.device
) -> Iterator[tuple[CaseFiles, np.ndarray, np.ndarray]]:
    """Each test case with its predicted and its reference class indices (the file's own
    voxel order), predicted by `predictor` (on `device`) as `card` describes."""
    _check_scheme(card, split)
    for case in split.cases:
        classes, _ = segment_classes(predictor, card, Scan(case.name, case.images), device)
        yield case, classes, _label_classes(case.label, split.class_of_value)


def score_predictor(
    predictor: Predictor, card: ModelCard, split: TestSplit, device: torch.device
) -> Scores:
    """IoU and Dice pooled over the test cases per class, as validation pools them."""
    counts = PooledCounts(split.scheme)  # pooled as validation is
    for _, prediction, reference in test_cases(predictor, card, split, device):
        counts.add(prediction, reference)
    return counts.scores()


@torch.no_grad()
def score_model(
    model: nn.Module, card: ModelCard, split: TestSplit, device: torch.device
) -> Scores:
    """IoU and Dice of `model` (on `device`), used as `card` describes, on the test split."""
    was_training = model.training
    model.eval()
    inference = card.inference
    single = predictor([model], inference.output, inference.spatial_dims, inference.tta)
    scores = score_predictor(single, card, split, device)
    model.train(was_training)
    return scores


def score_trial(
    study: optuna.Study,
    trial: FrozenTrial,
    weights: Path,
    split: TestSplit,
    device: torch.device,
    study_dir: Path | None = None,
) -> Scores:
    """Scores of a completed trial with `weights`, exported as nas.export would export it."""
    with tempfile.TemporaryDirectory(prefix="nas-heldout-") as scratch:
        folder = Path(scratch) / trial_name(trial.number)
        export(study, trial, weights, folder, formats=(), storage="", results=study_dir)
        single = load_predictor(folder, device, engine="eager")
        return score_predictor(single, read_card(folder), split, device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def score_trials(
    study: optuna.Study,
    study_dir: Path,
    trials: Sequence[FrozenTrial],
    split: TestSplit,
    device: torch.device,
) -> dict[int, dict[str, float]]:
    """{trial number: {"test_iou", "test_dice"}} for each completed trial of `trials` whose
    weights are in `study_dir`, stored in the study's "test_scores" attr. A trial already
    scored with the same weights and test files is not scored again; one without weights
    (off the front, or never saved) is left out."""
    stored = StudyRecord.of(study).test_scores
    scored, fresh = {}, {}
    files = trial_files(study, study_dir)
    for trial in trials:
        weights = checkpoint_path(study_dir, trial.number)
        if trial.state != TrialState.COMPLETE or files.local(weights) is None:
            continue
        try:
            stamp = {"checkpoint_sha256": _sha256(weights), "test_split": split.fingerprint}
        except FileNotFoundError:  # dropped by a concurrent rewrite of results/
            continue
        entry = stored.get(str(trial.number), {})
        if any(entry.get(key) != value for key, value in stamp.items()):
            scores = score_trial(study, trial, weights, split, device, study_dir)
            entry = {
                "test_iou": scores.iou,
                "test_dice": scores.dice,
                "test_iou_per_class": list(scores.iou_per_class),
                **stamp,
            }
            fresh[str(trial.number)] = entry
        scored[trial.number] = {"test_iou": entry["test_iou"], "test_dice": entry["test_dice"]}
    if fresh:  # read again: another process may have stored other trials meanwhile
        merge_study(study, "test_scores", fresh)
    return scored


def score_validation_volumes(
    study: optuna.Study,
    study_dir: Path,
    trials: Sequence[FrozenTrial],
    data: TrainingData,
    device: torch.device,
) -> float:
    """Each completed trial of `trials` on the whole validation volumes (sliding windows, as
    predict), stored in the study's "volume_scores" attr beside the patch score the search
    decided on; a trial already scored is not scored again (its weights never change). The
    seconds it took."""
    start = time.perf_counter()
    stored = StudyRecord.of(study).volume_scores
    fresh = {}
    files = trial_files(study, study_dir)
    for trial in trials:
        weights = checkpoint_path(study_dir, trial.number)
        if str(trial.number) in stored or trial.state != TrialState.COMPLETE:
            continue
        if not data.val_cases or files.local(weights) is None:  # another host's: fetched
            continue
        record = TrialRecord.of(trial)
        candidate = record.candidate()
        unet = candidate.unet
        patch = candidate.train.patch_size(unet.spatial_dims)
        model = build_unet(unet)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        began = time.perf_counter()
        scores = evaluate(model.to(device), data.val_cases, data.scheme, patch, device,
                          data.slicing.axis)  # fmt: skip
        fresh[str(trial.number)] = {"iou": scores.iou, "dice": scores.dice,
                                    "case_dice": scores.case_dice,
                                    "seconds": round(time.perf_counter() - began, 2)}  # fmt: skip
    if fresh:  # read again: another process may have stored other trials meanwhile
        merge_study(study, "volume_scores", fresh)
    return time.perf_counter() - start


def _score_with_times(
    classes_of: Callable[[CaseFiles], np.ndarray], split: TestSplit
) -> dict[str, float]:
    """Dice, IoU (pooled as validation pools them), mean HD95 and the median seconds per case
    of a segmenter (`classes_of`: a test case's class indices in its file's voxel order)."""
    from nas.validation.metrics import case_metrics  # noqa: PLC0415 (only these comparisons need MONAI)

    scheme = split.scheme  # scored per class, or per region, as validation scores
    regions = dict(zip(scheme.scored_names, scheme.covers, strict=True))
    counts, hd95, seconds = PooledCounts(scheme), [], []
    for case in split.cases:
        start = time.perf_counter()
        prediction = classes_of(case)
        seconds.append(time.perf_counter() - start)
        reference = _label_classes(case.label, split.class_of_value)
        counts.add(prediction, reference)
        spacing = nib.load(case.label).header.get_zooms()[:3]
        metrics = case_metrics(case.name, prediction, reference, spacing, regions)
        hd95.append(np.mean([m.hd95_mm for m in metrics]))
    scores = counts.scores()
    return {
        "test_dice": scores.dice,
        "test_iou": scores.iou,
        "test_hd95_mm": float(np.mean(hd95)),
        "seconds_per_case": float(np.median(seconds)),
    }


def _check_scheme(card: ModelCard, split: TestSplit) -> None:
    scheme = card.scheme()
    if scheme.covers != split.scheme.covers:
        theirs = split.scheme.scored_names
        raise ValueError(f"the model scores {scheme.scored_names}, the test split {theirs}")


def compare_ensemble(
    study: optuna.Study,
    trial: FrozenTrial,
    fold_weights: dict[str, Path],
    single: str,
    split: TestSplit,
    device: torch.device,
    postprocessing: Sequence[str] = (),
) -> list[dict]:
    """Held-out scores and inference time per case of one cross-validated member: the
    model of fold `single` alone, the ensemble of all `fold_weights`, and the ensemble with
    mirroring, each exported as nas.export would export it (eager engine)."""
    variants = {
        "single": ({single: fold_weights[single]}, "none"),
        "ensemble": (fold_weights, "none"),
        "ensemble + mirror": (fold_weights, "mirror"),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="nas-ensemble-") as scratch:
        for variant, (members, tta) in variants.items():
            folder = Path(scratch) / variant.replace(" + ", "_")
            export(study, trial, members, folder, (), "", tta=tta, postprocessing=postprocessing)
            card = read_card(folder)
            _check_scheme(card, split)
            model = load_predictor(folder, device, engine="eager")

            def classes_of(case: CaseFiles, model=model, card=card) -> np.ndarray:
                return segment_classes(model, card, Scan(case.name, case.images), device)[0]

            row = {"trial": trial.number, "variant": variant, "members": len(members),
                   "passes_per_window": model.passes}  # fmt: skip
            rows.append(row | _score_with_times(classes_of, split))
    return rows


def score_member_ensemble(folder: Path, split: TestSplit, device: torch.device) -> dict:
    """Held-out scores and seconds per case of an ensemble folder of different networks
    (nas export --ensemble members), predicted as nas.predict predicts it (eager engine)."""
    from nas.deploy.predict import read_members, segment_scan
    from nas.deploy.probabilities import label_description

    folders, cards, postprocessing = read_members(folder)
    _check_scheme(cards[0], split)
    predictors = [load_predictor(f, device, engine="eager") for f in folders]
    labels = label_description(cards[0], postprocessing)

    def classes_of(case: CaseFiles) -> np.ndarray:
        scan = Scan(case.name, case.images)
        return segment_scan(predictors, cards, labels, scan, device)[0]

    return {
        "members": len(folders),
        "passes_per_window": sum(p.passes for p in predictors),
        **_score_with_times(classes_of, split),
    }
