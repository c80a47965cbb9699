"""Saved probabilities: what `nas predict --save-probabilities` writes and `nas ensemble` reads.

Beside each mask `<case>.nii.gz`, a compressed `<case>.npz` holds:
  probabilities  (K, X, Y, Z) float32 in the scan's own voxel order: channel k is the
                 network's output k (softmax over the classes, or a sigmoid per region), and
                 outside the cropped box background (softmax: 1 on channel 0; sigmoid: 0);
  affine, header the scan's NIfTI affine and header, so a mask made from them lies exactly on
                 the scan;
  labels         the model card's labels, regions, region order and postprocessing, as JSON.
The file is read with allow_pickle=False: a saved probability map cannot carry code.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.errors import NasError

if TYPE_CHECKING:
    import nibabel as nib

    from nas.model_card import ModelCard

SUFFIX = ".npz"
_HEADERS = ("Nifti1Header", "Nifti2Header")


def probabilities_path(mask: Path) -> Path:
    """Where the probabilities of the mask file `mask` go: `<case>.npz` beside it."""
    from nas.data.layouts import nifti_stem

    return mask.with_name(f"{nifti_stem(mask.name) or mask.stem}{SUFFIX}")


def label_description(
    card: ModelCard, largest_component: Sequence[str] | None = None
) -> dict[str, Any]:
    """What turns a card's probabilities into a mask: its labels, regions and postprocessing
    (or, for an ensemble of different networks, the ensemble's `largest_component`)."""
    if largest_component is None:
        largest_component = card.postprocessing.largest_component
    return {
        "labels": dict(card.labels),
        "regions": {k: list(v) for k, v in card.regions.items()} if card.regions else None,
        "regions_class_order": list(card.regions_class_order or []) or None,
        "largest_component": list(largest_component),
    }


def save(
    path: Path,
    probabilities: np.ndarray,
    image: nib.spatialimages.SpatialImage,
    labels: dict[str, Any],
) -> None:
    """Write one scan's probabilities (K, *image shape) with the geometry of `image` and the
    `labels` (label_description's form) that turn them into a mask."""
    header = image.header
    if type(header).__name__ not in _HEADERS:
        header = image.header.from_header(image.header)  # e.g. an Analyze scan: as NIfTI-1
    np.savez_compressed(
        path,
        probabilities=probabilities.astype(np.float32, copy=False),
        affine=np.asarray(image.affine, np.float64),
        header=np.frombuffer(header.binaryblock, np.uint8),
        header_class=np.array(type(header).__name__),
        labels=np.array(json.dumps(labels)),
    )


@dataclass(frozen=True)
class SavedProbabilities:
    path: Path
    probabilities: np.ndarray  # (K, X, Y, Z) float32
    affine: np.ndarray
    header: bytes
    header_class: str
    labels: dict[str, Any]  # as label_description gives it

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.probabilities.shape)

    def like(self) -> nib.spatialimages.SpatialImage:
        """An image with the scan's affine and header, for nas.predict.write_mask."""
        import nibabel as nib

        header_type = getattr(nib, self.header_class)
        image_type = nib.Nifti1Image if self.header_class == "Nifti1Header" else nib.Nifti2Image
        header = header_type(binaryblock=self.header)
        return image_type(np.zeros(self.shape[1:], np.uint8), self.affine, header)


def load(path: Path) -> SavedProbabilities:
    """One saved file; anything else is refused with one line naming it."""
    wrong = "is not a probability map written by nas predict --save-probabilities"
    try:
        with np.load(path, allow_pickle=False) as saved:
            fields = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise NasError(path, f"{wrong} ({err})") from None
    needed = {"probabilities", "affine", "header", "header_class", "labels"}
    if not needed <= set(fields):
        raise NasError(path, f"{wrong} (it lacks {', '.join(sorted(needed - set(fields)))})")
    probabilities, affine = fields["probabilities"], fields["affine"]
    header_class = str(fields["header_class"])
    if probabilities.ndim != 4 or affine.shape != (4, 4) or header_class not in _HEADERS:
        raise NasError(path, f"{wrong} (probabilities of shape {probabilities.shape})")
    try:
        labels = json.loads(str(fields["labels"]))
    except json.JSONDecodeError:
        raise NasError(path, f"{wrong} (its labels are not JSON)") from None
    return SavedProbabilities(
        path, probabilities.astype(np.float32, copy=False), affine,
        fields["header"].tobytes(), header_class, labels,
    )  # fmt: skip


def classes_of_mean(probabilities: Sequence[np.ndarray], labels: dict[str, Any]) -> np.ndarray:
    """The class map (uint8, 0 = background) of the mean of several models' probabilities
    (each (K, X, Y, Z)), labelled as `labels` (label_description's form) says: argmax, or
    each region above 0.5 in order, then its classes reduced to their largest component."""
    import torch

    from nas.labels import LabelScheme
    from nas.postprocess import keep_largest_component

    mean = np.mean(probabilities, axis=0) if len(probabilities) > 1 else probabilities[0]
    scheme = LabelScheme.from_description(labels)
    classes = scheme.classes_from_probabilities(torch.from_numpy(mean)).numpy()
    names = list(labels["labels"])
    chosen = [names.index(name) for name in labels["largest_component"]]
    return keep_largest_component(classes, chosen) if chosen else classes
