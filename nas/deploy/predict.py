"""Segment NIfTI scans with an exported model: each scan preprocessed as the model was trained
(orientation, spacing, crop, normalisation), predicted window by window, postprocessed as its
card says, and brought back to the scan's own grid and affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.staging import check_output_folder
from nas.data.layouts import Scan

if TYPE_CHECKING:
    import nibabel as nib
    import numpy as np
    import torch

    from nas.network.inference import Predictor
    from nas.network.model_card import ModelCard


# nas.network.inference.ENGINES and nas.network.windows.DEFAULT_OVERLAP, spelled out so that
# --help does not import torch (tests/commands/test_cli.py checks that they agree).
ENGINES = ("auto", "eager", "pt2", "onnx")


DEFAULT_OVERLAP = 0.25


def _from_ras(mask: np.ndarray, image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """A RAS-ordered array back in the voxel order of `image` (undoing as_closest_canonical)."""
    import nibabel as nib

    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    own = nib.io_orientation(image.affine)
    return nib.orientations.apply_orientation(mask, nib.orientations.ornt_transform(ras, own))


def mask_values(labels: dict[str, int]) -> np.ndarray:
    """The label value of each class index, in the smallest unsigned type that holds them
    all: a uint8 mask would wrap a value of 256 or more."""
    import numpy as np

    largest = max(labels.values())
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32) if largest <= np.iinfo(t).max)
    return np.array(list(labels.values()), dtype)


def postprocess(classes: np.ndarray, card: ModelCard) -> np.ndarray:
    """The card's postprocessing applied to a class-index map."""
    from nas.validation.postprocess import keep_largest_component

    names = list(card.labels)
    chosen = [names.index(name) for name in card.postprocessing.largest_component]
    return keep_largest_component(classes, chosen) if chosen else classes


@dataclass
class ScanPrediction:
    """One scan's probabilities in its preprocessed (RAS, cropped, resampled-back) box."""

    probabilities: torch.Tensor  # (K, *box shape): what the predictor gives, per output
    box: tuple[slice, ...]  # where the box lies in the RAS volume
    shape: tuple[int, ...]  # of the RAS volume
    image: nib.spatialimages.SpatialImage  # the scan's first image, as read

    def classes(self, card: ModelCard) -> np.ndarray:
        """Class indices (uint8, 0 = background, in the order of `card.labels`) in the
        scan's own voxel order, postprocessed as the card says."""
        import numpy as np

        classes = np.zeros(self.shape, np.uint8)
        in_box = card.scheme().classes_from_probabilities(self.probabilities)
        classes[self.box] = postprocess(in_box.cpu().numpy(), card)
        return _from_ras(classes, self.image)

    def full_probabilities(self, card: ModelCard) -> np.ndarray:
        """(K, X, Y, Z) float32 in the scan's own voxel order; outside the box, background
        (softmax: probability 1 on channel 0; sigmoid: 0 everywhere)."""
        import numpy as np

        full = np.zeros((*self.shape, self.probabilities.shape[0]), np.float32)
        if card.scheme().output == "softmax":
            full[..., 0] = 1.0
        full[self.box] = self.probabilities.movedim(0, -1).float().cpu().numpy()
        return np.ascontiguousarray(np.moveaxis(_from_ras(full, self.image), -1, 0))


def predict_scan(
    predictor: Predictor,
    card: ModelCard,
    scan: Scan,
    device: torch.device,
    overlap: float = DEFAULT_OVERLAP,
) -> ScanPrediction:
    """`predictor`'s probabilities for one scan, run on `device` on sliding windows that
    overlap by `overlap`."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    from nas.data.preprocess import (
        check_target_grid,
        prepare_image,
        read_channels,
        spacing_of,
    )
    from nas.network.memory import estimate_inference_bytes
    from nas.network.windows import predict_logits, windows_per_batch, windows_that_fit

    with torch.no_grad():
        prep, inference = card.preprocessing, card.inference
        plan = prep.plan(card.labels)
        # Per resampled voxel (float32): the image, one channel's resampling, the copy the
        # windows are cut from, the blended outputs and their weights.
        per_voxel = 4 * (2 * len(plan.channels) + 2 + card.scheme().out_channels)
        check_target_grid(scan.images[0], plan, per_voxel)
        # The checks a training case gets (nas/data/preprocess.py): header, affine, voxels.
        channels, paths, _ = read_channels(scan.images, len(prep.input_channels))
        image, box = prepare_image(channels, spacing_of(paths[0]), plan)
        unet = card.unet_config()
        window = estimate_inference_bytes(unet, inference.patch_size, unet.in_channels)
        # 8 at most: each window runs through every member and mirroring.
        wanted = min(8, windows_per_batch(len(inference.patch_size), device))
        probs = predict_logits(
            predictor,
            image,
            inference.patch_size,
            device,
            inference.slice_axis,
            windows_that_fit(wanted, window, device),
            overlap=overlap,
        )
        box_shape = tuple(s.stop - s.start for s in box)
        if tuple(probs.shape[1:]) != box_shape:
            probs = F.interpolate(probs[None], size=box_shape, mode="trilinear")[0]
    return ScanPrediction(probs, tuple(box), tuple(channels[0].shape), nib.load(paths[0]))


def segment_classes(
    predictor: Predictor,
    card: ModelCard,
    scan: Scan,
    device: torch.device,
    overlap: float = DEFAULT_OVERLAP,
) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Class indices (uint8, 0 = background, in the order of `card.labels`) of one scan in
    its own voxel order, and the scan's first image."""
    prediction = predict_scan(predictor, card, scan, device, overlap)
    return prediction.classes(card), prediction.image


def write_mask(mask: np.ndarray, like: nib.spatialimages.SpatialImage, path: Path) -> None:
    import nibabel as nib

    header = like.header.copy()
    header.set_data_dtype(mask.dtype)
    image = type(like)(mask, like.affine, header)
    image.header.set_slope_inter(1, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def output_paths(source: Path, output: Path, scans: Sequence[Scan]) -> list[Path]:
    from nas.data.layouts import nifti_stem

    single_file = source.is_file() and nifti_stem(output.name) is not None
    if single_file:
        paths = [output]
    else:
        if output.exists() and not output.is_dir():
            raise NasError(output, "exists and is not a folder")
        paths = [output / f"{scan.name}.nii.gz" for scan in scans]
    check_output_folder(paths[0].parent)
    inputs = {p.resolve() for scan in scans for p in scan.images}
    for path in paths:
        if path.resolve() in inputs:
            raise NasError(path, "is an input scan; choose another OUTPUT")
    return paths


def read_members(folder: Path) -> tuple[list[Path], list[ModelCard], tuple[str, ...] | None]:
    """The model folders a MODEL stands for, their cards, and for an ensemble of different
    networks (ensemble.yaml) its postprocessing (None for a single model's folder). The
    members must take the same channels and give the same labels."""
    from nas.network.model_card import read_card, read_ensemble_card

    ensemble = read_ensemble_card(folder)
    if ensemble is None:
        return [folder], [read_card(folder)], None
    folders = [folder / name for name in ensemble.members]
    cards = [read_card(member) for member in folders]
    first = cards[0]
    for member, card in zip(folders[1:], cards[1:], strict=True):
        if card.preprocessing.input_channels != first.preprocessing.input_channels:
            raise NasError(member, f"takes other input channels than {folders[0].name}")
        if (card.labels, card.regions) != (first.labels, first.regions):
            raise NasError(member, f"gives other labels than {folders[0].name}")
    return folders, cards, ensemble.postprocessing.largest_component


def segment_scan(
    predictors: Sequence[Predictor],
    cards: Sequence[ModelCard],
    labels: dict,
    scan: Scan,
    device: torch.device,
    overlap: float = DEFAULT_OVERLAP,
    with_probabilities: bool = False,
) -> tuple[np.ndarray, nib.spatialimages.SpatialImage, np.ndarray | None]:
    """Class indices of one scan in its own voxel order, its first image, and with
    `with_probabilities` the probabilities (K, X, Y, Z) they came from. One model (or its
    folds) runs one pass per window; different networks (an ensemble.yaml folder) each run
    on their own windows and are averaged on the scan's grid, then labelled as `labels`
    (probabilities.label_description) says."""
    from nas.deploy.probabilities import classes_of_mean

    if len(predictors) == 1:
        prediction = predict_scan(predictors[0], cards[0], scan, device, overlap)
        probs = prediction.full_probabilities(cards[0]) if with_probabilities else None
        return prediction.classes(cards[0]), prediction.image, probs
    predictions = [
        predict_scan(predictor, card, scan, device, overlap)
        for predictor, card in zip(predictors, cards, strict=True)
    ]
    full = [p.full_probabilities(card) for p, card in zip(predictions, cards, strict=True)]
    mean = sum(full) / len(full)
    return (
        classes_of_mean([mean], labels),
        predictions[0].image,
        mean if with_probabilities else None,
    )


@dataclass(frozen=True)
class Job:
    """What `nas predict` was asked to do, found and checked before torch loads: the model
    folders and their cards, the scans and the mask each one becomes."""

    folders: list[Path]
    cards: list[ModelCard]
    ensemble_postprocessing: tuple[str, ...] | None
    scans: list[Scan]
    outputs: list[Path]


def plan(model: Path, source: Path, output: Path) -> Job:
    """The job of segmenting the scans of `source` (a file or a folder) with the model folder
    `model` into `output`; a NasError for a model, scan or output nas cannot use."""
    from nas.data.layouts import find_scans

    folders, cards, ensemble_postprocessing = read_members(model)
    scans = find_scans(source, len(cards[0].preprocessing.input_channels))
    outputs = output_paths(source, output, scans)
    return Job(folders, cards, ensemble_postprocessing, scans, outputs)


def write_masks(
    job: Job,
    device: torch.device,
    engine: str = "auto",
    tta: str | None = None,
    overlap: float = DEFAULT_OVERLAP,
    save_probabilities: bool = False,
) -> None:
    """Segment the job's scans, writing each mask (and with `save_probabilities` its
    probabilities beside it); a progress bar on a terminal, nothing in a log file."""
    from tqdm import tqdm

    from nas.deploy import probabilities
    from nas.deploy.exported import load_predictor

    card = job.cards[0]
    predictors = [load_predictor(f, device, engine, tta) for f in job.folders]
    labels = probabilities.label_description(card, job.ensemble_postprocessing)
    # disable=None: a progress bar on a terminal, nothing in a log file.
    progress = tqdm(
        list(zip(job.scans, job.outputs, strict=True)), unit="scan", leave=False, disable=None
    )
    values = mask_values(card.labels)
    for scan, path in progress:
        progress.set_postfix_str(scan.name)
        classes, image, probs = segment_scan(
            predictors, job.cards, labels, scan, device, overlap, save_probabilities
        )
        write_mask(values[classes], image, path)
        if probs is not None:
            probabilities.save(probabilities.probabilities_path(path), probs, image, labels)
