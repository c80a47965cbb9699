"""Held-out test scores: the front's models on test cases that the search never saw.

A dataset's test split is `imagesTs/` + `labelsTs/` beside imagesTr/ (labelsTs is not
standard nnU-Net, but datasets often ship it), or the folder `data.test` names. Each trial is
scored through its export: the folder nas.export writes (without the pt2/ONNX programs), then
nas.predict's own path on every test scan (raw NIfTI, the recorded preprocessing, sliding
windows, back to the scan's grid), so the score is that of the model a user would ship, not
of the cached arrays the search validated on. Test labels map to classes as the training
labels do (`data.foreground`); IoU and Dice are pooled over the test cases per class (or
region) and averaged over them, as validation is. The scores live in the study's user attr
"test_scores" with the fingerprints of the weights and the test files they came from, so a
trial is scored again only when one of them changes. Nothing here is read by the sampler,
the pruner or the front: these scores report, they never select.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from nas.data import DataConfig, Dataset
from nas.data.layouts import CaseFiles, nifti_stem
from nas.data.preprocess import check_finite, read_channels, read_label
from nas.errors import NasError
from nas.export import export
from nas.exported import ModelCard, load_predictor, read_card
from nas.inference import Predictor, predictor
from nas.labels import LabelScheme
from nas.predict import Scan, find_scans, segment_classes
from nas.results import TEST_SCORES_ATTR, checkpoint_path
from nas.validate import PooledCounts, Scores

IMAGES, LABELS = "imagesTs", "labelsTs"


@dataclass(frozen=True)
class TestSplit:
    __test__ = False  # a dataset's test split, not a pytest test class

    folder: Path  # holds imagesTs/ and labelsTs/
    cases: tuple[CaseFiles, ...]  # images: one file per channel, or one (4D) file
    class_of_value: dict[int, int]  # label value -> class index, as in training
    scheme: LabelScheme  # the classes (or regions) scored, as in training
    fingerprint: str  # of the files (paths, sizes, mtimes) and the class mapping


def find_test_split(data: DataConfig, dataset: Dataset) -> TestSplit | None:
    """The test cases of `data` (its `test` folder, else imagesTs/ + labelsTs/ inside the
    dataset), checked as training cases are; None when there are none to score. `dataset` is
    the training dataset as loaded for the search: its channels and label mapping apply."""
    folder = Path(data.test) if data.test is not None else dataset.root
    images, labels = folder / IMAGES, folder / LABELS
    if data.test is None and not (images.is_dir() and labels.is_dir()):
        return None  # nnU-Net's own imagesTs has no labels: nothing to score against
    if not folder.is_dir():
        raise NasError(folder, "test folder (data.test) not found")
    for sub in (images, labels):
        if not sub.is_dir():
            raise NasError(sub, f"not found: a test folder holds {IMAGES}/ and {LABELS}/")
    n_channels = len(dataset.source_channel_names)
    label_files = _nifti_files(labels)
    cases = []
    for scan in find_scans(images, n_channels):
        if scan.name not in label_files:
            raise NasError(scan.images[0], f"test image without a label in {labels}")
        cases.append(CaseFiles(scan.name, scan.images, label_files.pop(scan.name)))
    if label_files:
        path = next(iter(label_files.values()))
        raise NasError(path, f"test label without an image in {images}")
    declared = "dataset.json" if (dataset.root / "dataset.json").is_file() else "the masks"
    for case in cases:
        _check_case(case, n_channels, dataset.plan.class_of_value, declared)
    return TestSplit(
        folder,
        tuple(cases),
        dict(dataset.plan.class_of_value),
        dataset.scheme,
        _fingerprint(cases, dataset.plan.class_of_value),
    )


def _nifti_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        name = nifti_stem(path.name)
        if name is not None and path.is_file():
            if name in files:
                raise NasError(path, f"gives the same case name {name!r} as {files[name].name}")
            files[name] = path
    return files


def _check_case(
    case: CaseFiles, n_channels: int, class_of_value: dict[int, int], declared: str
) -> None:
    """The checks a training case gets: channels, shapes, affines, finite voxels, labels."""
    channels, paths, affine = read_channels(case.images, n_channels)
    check_finite(channels, paths)
    label = read_label(case, channels[0].shape, affine)
    undeclared = sorted(set(np.unique(label).tolist()) - set(class_of_value))
    if undeclared:
        known = ", ".join(str(v) for v in sorted(class_of_value))
        raise NasError(
            case.label, f"label values {undeclared} are not declared in {declared} ({known})"
        )


def _fingerprint(cases: Sequence[CaseFiles], class_of_value: dict[int, int]) -> str:
    files = []
    for case in cases:
        for path in (*case.images, case.label):
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"files": files, "classes": sorted(class_of_value.items())})
    return hashlib.sha256(blob.encode()).hexdigest()


def _label_classes(path: Path, class_of_value: dict[int, int]) -> np.ndarray:
    """A test label as class indices, in the file's own voxel order (as predicted masks)."""
    label = np.asanyarray(nib.load(path).dataobj)
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
    scheme = card.scheme()
    if scheme.covers != split.scheme.covers:
        theirs = split.scheme.scored_names
        raise ValueError(f"the model scores {scheme.scored_names}, the test split {theirs}")
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
        folder = Path(scratch) / f"trial_{trial.number:04d}"
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
    stored = study.user_attrs.get(TEST_SCORES_ATTR, {})
    scored, fresh = {}, {}
    for trial in trials:
        weights = checkpoint_path(study_dir, trial.number)
        if trial.state != TrialState.COMPLETE or not weights.is_file():
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
        merged = {**study.user_attrs.get(TEST_SCORES_ATTR, {}), **fresh}
        study.set_user_attr(TEST_SCORES_ATTR, merged)
    return scored


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
    from nas.metrics import case_metrics  # noqa: PLC0415 (only this comparison needs MONAI)

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
            model = load_predictor(folder, device, engine="eager")
            scheme = split.scheme  # scored per class, or per region, as validation scores
            regions = dict(zip(scheme.scored_names, scheme.covers, strict=True))
            counts, hd95, seconds = PooledCounts(scheme), [], []
            start = time.perf_counter()
            for case, prediction, reference in test_cases(model, card, split, device):
                seconds.append(time.perf_counter() - start)
                counts.add(prediction, reference)
                spacing = nib.load(case.label).header.get_zooms()[:3]
                metrics = case_metrics(case.name, prediction, reference, spacing, regions)
                hd95.append(np.mean([m.hd95_mm for m in metrics]))
                start = time.perf_counter()
            scores = counts.scores()
            rows.append(
                {
                    "trial": trial.number,
                    "variant": variant,
                    "members": len(members),
                    "passes_per_window": model.passes,
                    "test_dice": scores.dice,
                    "test_iou": scores.iou,
                    "test_hd95_mm": float(np.mean(hd95)),
                    "seconds_per_case": float(np.median(seconds)),
                }
            )
    return rows
