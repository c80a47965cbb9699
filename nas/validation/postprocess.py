"""Postprocessing of predicted classes: keep each class's largest connected component.

nnU-Net's rule decides where it applies: on the cross-validation's out-of-fold predictions,
a class keeps only its largest component when that raises the class's mean Dice over the
cases, and is left alone otherwise. Connectivity is full (26 neighbours in 3D).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from nas.validation.metrics import dice_from_counts


def keep_largest_component(classes: np.ndarray, class_indices: Iterable[int]) -> np.ndarray:
    """`classes` (a class-index map) with every voxel of the named classes outside their
    largest connected component set to background."""
    result = np.array(classes, copy=True)
    structure = ndimage.generate_binary_structure(classes.ndim, classes.ndim)
    for k in class_indices:
        components, n = ndimage.label(classes == k, structure)
        if n > 1:
            sizes = np.bincount(components.ravel())[1:]
            result[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return result


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, n_classes: int) -> list[float]:
    """Dice of each foreground class 1..n_classes on one case (1.0 where both are empty)."""
    scores = []
    for k in range(1, n_classes + 1):
        p, r = prediction == k, reference == k
        scores.append(float(dice_from_counts(np.logical_and(p, r).sum(), p.sum(), r.sum())))
    return scores


def classes_helped(
    plain: Sequence[Sequence[float]], largest: Sequence[Sequence[float]]
) -> list[int]:
    """The class indices (1-based) whose mean Dice over the cases rises with the largest
    component only. `plain`, `largest`: per case, the Dice of each class without and with."""
    if not plain:
        return []
    gain = np.mean(np.asarray(largest, float), 0) - np.mean(np.asarray(plain, float), 0)
    return [k + 1 for k, g in enumerate(gain) if g > 0]
