"""Training batches of 2D slices or 3D patches, and the train/validation split by case.

2D samples are slices along `Slicing.axis`, 3D samples are patches; one crop routine serves
both by treating a slice as a patch one voxel thick. A fixed fraction of samples is centred
on a foreground voxel, because lesions are tiny and random crops would rarely see one.
Each sample is augmented as nnU-Net does (`nas.data.augment`, MONAI's transforms, loaded only
when a sampler augments, so that `import nas.data` stays free of torch).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nas.core.errors import NasError
from nas.data.cache import Case


@dataclass(frozen=True)
class Slicing:
    """How 2D candidates see the volumes.

    axis: the slice axis (0, 1, 2 in RAS order; 2 is axial).
    per_case: train on this many fixed slices of each case, drawn once with `seed`: up to
        half among the slices showing foreground, the rest among the others (None: all).
    """

    axis: int = 2
    per_case: int | None = None
    seed: int = 0


def split_cases(
    cases: Sequence[Case], n_folds: int, fold: int, seed: int, splits_file: Path | None = None
) -> tuple[list[Case], list[Case]]:
    """A seeded k-fold split by case, or the `fold` entry of an nnU-Net splits_final.json."""
    by_name = {case.name: case for case in cases}
    if splits_file is not None:
        val_names = _read_split(splits_file, fold, by_name)
    else:
        if len(cases) < n_folds:
            raise ValueError(f"has {len(cases)} cases, fewer than the {n_folds} folds asked for")
        order = np.random.default_rng(seed).permutation(len(cases))
        val_names = {cases[i].name for i in np.array_split(order, n_folds)[fold]}
    return (
        [c for c in cases if c.name not in val_names],
        [c for c in cases if c.name in val_names],
    )


def _read_split(path: Path, fold: int, by_name: dict[str, Case]) -> set[str]:
    """The validation cases of `fold`, once the whole file is found to describe folds of
    this dataset (`check_splits`)."""
    splits = read_splits(path)
    check_splits(path, splits, set(by_name))
    if fold >= len(splits):
        raise NasError(path, f"has {len(splits)} folds; fold {fold} does not exist")
    val = set(splits[fold]["val"])
    if not val or val == set(by_name):
        raise NasError(path, f"fold {fold} must leave cases on both sides")
    return val


def read_splits(path: Path) -> list[dict[str, list[str]]]:
    """The folds of an nnU-Net splits_final.json: [{'train': [names], 'val': [names]}, ...]."""
    try:
        splits = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NasError(path, "not found") from None
    except json.JSONDecodeError as err:
        raise NasError(path, f"not valid JSON ({err})") from None
    except UnicodeDecodeError:
        raise NasError(path, "not valid JSON: not UTF-8 text") from None
    if not isinstance(splits, list) or not all(
        isinstance(s, dict)
        and set(s) == {"train", "val"}
        and all(isinstance(names, list) for names in s.values())
        and all(isinstance(name, str) for names in s.values() for name in names)
        for s in splits
    ):
        raise NasError(
            path, "must be a list of {'train': [names], 'val': [names]} (nnU-Net format)"
        )
    return splits


def check_splits(path: Path, splits: list[dict[str, list[str]]], cases: set[str]) -> None:
    """Folds that contradict themselves or the dataset are refused, naming the fold and the
    case: a case the dataset does not have, a case in both the training and the validation
    cases of a fold, a case a fold leaves out of both, or a case two folds validate on
    (nnU-Net's folds validate on disjoint cases)."""
    validated_in: dict[str, int] = {}
    for fold, split in enumerate(splits):
        train, val = set(split["train"]), set(split["val"])
        unknown = sorted((train | val) - cases)
        if unknown:
            side = "val" if unknown[0] in val else "train"
            raise NasError(path, f"fold {fold} {side}: {unknown[0]!r} is not a case of the dataset")
        both, neither = sorted(train & val), sorted(cases - train - val)
        if both:
            raise NasError(path, f"fold {fold}: {both[0]!r} is in both its train and its val cases")
        if neither:
            raise NasError(
                path, f"fold {fold}: {neither[0]!r} is in neither its train nor its val cases"
            )
        twice = sorted(val & validated_in.keys())
        if twice:
            raise NasError(
                path,
                f"fold {fold}: {twice[0]!r} is validated on in fold {validated_in[twice[0]]} too "
                "(folds validate on disjoint cases)",
            )
        validated_in.update(dict.fromkeys(val, fold))


def validation_centres(
    cases: Sequence[Case], per_case: int, foreground_fraction: float, seed: int
) -> list[np.ndarray]:
    """Per case, `per_case` voxels (n, 3) drawn once with `seed`: a share foreground_fraction
    of them on foreground (where the case has any), the rest anywhere in the volume. Every
    candidate of a search is validated on patches centred on the same voxels."""
    rng = np.random.default_rng(seed)
    centres = []
    for case in cases:
        shape = np.asarray(case.label).shape
        foreground = np.argwhere(np.asarray(case.label) > 0)
        n_foreground = round(foreground_fraction * per_case) if len(foreground) else 0
        on = foreground[rng.integers(len(foreground), size=n_foreground)] if n_foreground else []
        anywhere = [[rng.integers(d) for d in shape] for _ in range(per_case - n_foreground)]
        centres.append(np.array([*on, *anywhere], dtype=np.int64).reshape(-1, 3))
    return centres


def patch_at(
    case: Case, centre: Sequence[int], patch_size: Sequence[int], slice_axis: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """The image (C, *patch) and label (*patch) of the patch centred on `centre`: a slice of
    the centre's plane along `slice_axis` for a 2D patch, zero-padded where outside."""
    size = list(patch_size)
    if len(size) == 2:
        size.insert(slice_axis, 1)
    shape, size_ = np.asarray(case.label.shape), np.asarray(size)
    start = np.asarray(centre) - size_ // 2  # inside the volume where it fits, as training's
    start = np.clip(start, np.minimum(0, shape - size_), np.maximum(0, shape - size_))
    image = _crop(case.image, start, size)
    label = _crop(case.label, start, size)
    if len(patch_size) == 2:
        image, label = np.take(image, 0, axis=slice_axis + 1), np.take(label, 0, axis=slice_axis)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


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


def _training_slices(label: np.ndarray, slicing: Slicing, rng: np.random.Generator) -> np.ndarray:
    axis, count = slicing.axis, slicing.per_case
    n_slices = label.shape[axis]
    if count is None or count >= n_slices:
        return np.arange(n_slices)
    other = tuple(a for a in range(3) if a != axis)
    has_foreground = np.asarray(label).any(axis=other)
    with_fg, without = np.flatnonzero(has_foreground), np.flatnonzero(~has_foreground)
    n_fg = min(len(with_fg), (count + 1) // 2)
    n_rest = min(len(without), count - n_fg)
    n_fg = count - n_rest  # top up from foreground slices where few are empty
    chosen = [
        *rng.choice(with_fg, n_fg, replace=False),
        *rng.choice(without, n_rest, replace=False),
    ]
    return np.sort(np.array(chosen, dtype=np.int64))


class PatchSampler:
    """Draws random (image, label) batches from cases (in memory or memory-mapped).

    patch_size: (X, Y) in-plane for 2D slices, (X, Y, Z) for 3D patches.
    foreground_fraction: share of samples centred on a foreground voxel (where a case has one).
    augment: augment each sample (`nas.data.augment`), with rotations by up to
        +-rotation_deg, brightness within 1 +- intensity_scale, and each transform but
        mirroring and brightness applied to a share augment_probability of the samples.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        batch_size: int,
        foreground_fraction: float,
        augment: bool,
        seed: int,
        slicing: Slicing = Slicing(),
        rotation_deg: float = 15.0,
        intensity_scale: float = 0.1,
        augment_probability: float = 0.2,
    ) -> None:
        self.cases = list(cases)
        self.spatial_dims = len(patch_size)
        self.slice_axis = slicing.axis
        size = list(patch_size)
        if self.spatial_dims == 2:  # a slice is a patch one voxel thick along the slice axis
            size.insert(slicing.axis, 1)
        self.crop_size = tuple(size)
        self.batch_size = batch_size
        self.foreground_fraction = foreground_fraction
        self.augmentation = None
        if augment:
            from nas.data.augment import Augmentation, augment, training_transforms

            self.augmentation = Augmentation(augment_probability, rotation_deg, intensity_scale)
            transforms = training_transforms(self.spatial_dims, self.augmentation, seed)
            self._augment = functools.partial(augment, transforms=transforms)
        self.rng = np.random.default_rng(seed)
        # Training slices per case (2D); every voxel of them is a candidate patch centre.
        split_rng = np.random.default_rng(slicing.seed)
        self.slices = [
            _training_slices(case.label, slicing, split_rng) if self.spatial_dims == 2 else None
            for case in self.cases
        ]
        self.foreground = []
        for case, slices in zip(self.cases, self.slices, strict=True):
            voxels = np.argwhere(np.asarray(case.label) > 0)
            if slices is not None:
                voxels = voxels[np.isin(voxels[:, slicing.axis], slices)]
            self.foreground.append(voxels)

    def _start(self, case_index: int) -> np.ndarray:
        shape = np.array(self.cases[case_index].label.shape)
        size = np.array(self.crop_size)
        voxels = self.foreground[case_index]
        if len(voxels) and self.rng.random() < self.foreground_fraction:
            centre = voxels[self.rng.integers(len(voxels))]
            # Jitter so the lesion is not always in the middle of the patch.
            jitter = self.rng.integers(-(size // 4), size // 4 + 1)
            start = centre - size // 2 + jitter
            start = np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))
        else:
            start = np.array(
                [
                    self.rng.integers(min(0, d - n), max(0, d - n) + 1)
                    for d, n in zip(shape, size, strict=True)
                ]
            )
        if self.spatial_dims == 2:
            slices = self.slices[case_index]
            if len(voxels) == 0 or start[self.slice_axis] not in slices:
                start[self.slice_axis] = self.rng.choice(slices)
        return start

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """images (B, C, *patch) float32, labels (B, *patch) int64, on the host; the trainer
        moves them to its device (nas.training.fit.device_batch)."""
        images, labels = [], []
        for _ in range(self.batch_size):
            index = int(self.rng.integers(len(self.cases)))
            start = self._start(index)
            image = _crop(self.cases[index].image, start, self.crop_size)
            label = _crop(self.cases[index].label, start, self.crop_size)
            if self.spatial_dims == 2:
                image = np.take(image, 0, axis=self.slice_axis + 1)
                label = np.take(label, 0, axis=self.slice_axis)
            if self.augmentation is not None:
                image, label = self._augment(image, label)
            images.append(np.ascontiguousarray(image, dtype=np.float32))
            labels.append(np.ascontiguousarray(label))
        return np.stack(images), np.stack(labels).astype(np.int64)
