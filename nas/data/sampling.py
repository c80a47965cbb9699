"""Training batches of 2D slices or 3D patches, and the train/validation split by case.

2D samples are axial slices (the last, slice axis), 3D samples are patches; one crop routine
serves both by treating a 2D sample as a patch one voxel thick. A fixed fraction of samples is
centred on a foreground voxel, because lesions are tiny and random crops would rarely see one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nas.data.nnunet import Case


def split_by_case(
    cases: Sequence[Case], val_fraction: float, seed: int
) -> tuple[list[Case], list[Case]]:
    """Shuffle cases with `seed` and hold out `val_fraction` of them (at least one each side)."""
    if len(cases) < 2:
        raise ValueError("need at least two cases to split into training and validation")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    val = {int(i) for i in order[:n_val]}
    return (
        [c for i, c in enumerate(cases) if i not in val],
        [c for i, c in enumerate(cases) if i in val],
    )


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """array[..., start:start+size] over the last len(size) axes, zero-padded where outside."""
    lead = array.ndim - len(size)
    shape = array.shape[lead:]
    out = np.zeros(array.shape[:lead] + tuple(size), array.dtype)
    src = tuple(
        slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, shape, strict=True)
    )
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


class PatchSampler:
    """Draws random (image, label) batches from in-memory cases.

    patch_size: (X, Y) for 2D slices, (X, Y, Z) for 3D patches.
    foreground_fraction: share of samples centred on a foreground voxel (where a case has one).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        batch_size: int,
        foreground_fraction: float,
        augment: bool,
        seed: int,
    ) -> None:
        self.cases = list(cases)
        self.spatial_dims = len(patch_size)
        # A 2D slice is a patch of thickness 1 along the slice axis.
        self.crop_size = tuple(patch_size) + (1,) * (3 - self.spatial_dims)
        self.batch_size = batch_size
        self.foreground_fraction = foreground_fraction
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.foreground = [np.argwhere(case.label > 0) for case in self.cases]

    def _start(self, case_index: int) -> np.ndarray:
        case = self.cases[case_index]
        shape = np.array(case.label.shape)
        size = np.array(self.crop_size)
        voxels = self.foreground[case_index]
        if len(voxels) and self.rng.random() < self.foreground_fraction:
            centre = voxels[self.rng.integers(len(voxels))]
            # Jitter so the lesion is not always in the middle of the patch.
            jitter = self.rng.integers(-(size // 4), size // 4 + 1)
            start = centre - size // 2 + jitter
            return np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))
        return np.array(
            [
                self.rng.integers(min(0, d - n), max(0, d - n) + 1)
                for d, n in zip(shape, size, strict=True)
            ]
        )

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, *patch) float32, labels (B, *patch) int64."""
        images, labels = [], []
        for _ in range(self.batch_size):
            index = int(self.rng.integers(len(self.cases)))
            start = self._start(index)
            image = _crop(self.cases[index].image, start, self.crop_size)
            label = _crop(self.cases[index].label, start, self.crop_size)
            if self.spatial_dims == 2:
                image, label = image[..., 0], label[..., 0]
            if self.augment:
                for axis in range(self.spatial_dims):
                    if self.rng.random() < 0.5:
                        image, label = np.flip(image, axis + 1), np.flip(label, axis)
                image = image * self.rng.uniform(0.9, 1.1)
            images.append(np.ascontiguousarray(image))
            labels.append(np.ascontiguousarray(label))
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)).long()
