"""Saved probabilities of several models averaged into masks, as nnU-Net's ensemble: the
workflow of `nas ensemble`.

Each folder holds the `<case>.npz` files `nas predict --save-probabilities` wrote, one folder
per model. For every case the models' probabilities are averaged, turned into labels by their
common label scheme and reduced to the largest component where every model's card says so;
the mask has the scan's own shape, affine and header. Folders with other cases, grids or
labels are refused before the first mask is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nas.core.errors import NasError
from nas.core.staging import check_output_folder
from nas.deploy.probabilities import SUFFIX, SavedProbabilities, classes_of_mean, load


def case_names(folders: Sequence[Path]) -> list[str]:
    """The cases every folder holds; folders with other case sets are refused."""
    found = {}
    for folder in folders:
        if not folder.is_dir():
            raise NasError(folder, "is not a folder")
        found[folder] = {p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}")}
        if not found[folder]:
            raise NasError(folder, "holds no <case>.npz (run nas predict --save-probabilities)")
    first, names = folders[0], found[folders[0]]
    for folder in folders[1:]:
        missing, extra = names - found[folder], found[folder] - names
        if missing or extra:
            which = (
                f"lacks {', '.join(sorted(missing)[:3])}" if missing
                else f"has {', '.join(sorted(extra)[:3])}, which {first} lacks"
            )  # fmt: skip
            raise NasError(folder, f"holds other cases than {first}: it {which}")
    return sorted(names)


def check_compatible(saved: Sequence[SavedProbabilities]) -> None:
    first = saved[0]
    for other in saved[1:]:
        if {k: v for k, v in other.labels.items() if k != "largest_component"} != {
            k: v for k, v in first.labels.items() if k != "largest_component"
        }:
            raise NasError(other.path, f"comes from a model with other labels than {first.path}")
        if other.shape != first.shape:
            raise NasError(
                other.path, f"has probabilities of shape {other.shape}, {first.path} {first.shape}"
            )
        if not np.allclose(other.affine, first.affine, atol=1e-4):
            raise NasError(other.path, f"lies on another grid (affine) than {first.path}")


def average(saved: Sequence[SavedProbabilities]) -> np.ndarray:
    """The class map (uint8) of the mean probabilities, reduced to the largest component
    where every model's card says so."""
    common = set.intersection(*(set(s.labels["largest_component"]) for s in saved))
    names = list(saved[0].labels["labels"])
    labels = saved[0].labels | {"largest_component": [n for n in names if n in common]}
    return classes_of_mean([s.probabilities for s in saved], labels)


def write_ensemble_masks(folders: Sequence[Path], out: Path) -> list[str]:
    """OUT/<case>.nii.gz for every case the `folders` of probabilities hold, each the average
    of their models; the cases' names."""
    from nas.deploy.predict import mask_values, write_mask

    check_output_folder(out)
    if out.resolve() in {f.resolve() for f in folders}:
        raise NasError(out, "is one of the input folders; choose another OUT")
    names = case_names(folders)
    # Every case is checked before the first mask is written: nothing half done.
    for name in names:
        check_compatible([load(folder / f"{name}{SUFFIX}") for folder in folders])
    for name in names:
        saved = [load(folder / f"{name}{SUFFIX}") for folder in folders]
        values = mask_values(saved[0].labels["labels"])
        write_mask(values[average(saved)], saved[0].like(), out / f"{name}.nii.gz")
    return names
