"""Augmentation as nnU-Net does it, with MONAI's transforms: what they do to a sample, the
sampler's batches with all of them on, with none, and under a seed; and the training loader,
whose background workers draw reproducible batches."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai import transforms as mt

from nas.data import PatchSampler, Slicing
from nas.data.augment import Augmentation, augment, training_transforms
from nas.training.batches import training_batches, training_sampler, worker_seed
from nas.training.train_config import TrainConfig


def square_sample(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A 2D sample: a noisy image (1, size, size) and a label with classes 1 and 2 in a
    centred square of side size/4."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, size, size)).astype(np.float32)
    label = np.zeros((size, size), np.uint8)
    quarter = size // 8
    centre = slice(size // 2 - quarter, size // 2 + quarter)
    label[centre, centre] = 1
    label[size // 2 :, size // 2 :][:quarter, :quarter] = 2
    return image, label


@pytest.mark.parametrize("patch", [(32, 32), (24, 24, 8)])
def test_every_transform_keeps_shapes_dtypes_and_label_values(tiny_cases, patch):
    sampler = PatchSampler(tiny_cases, patch, 8, 1.0, True, seed=0, augment_probability=1.0)
    label_values = set().union(*(np.unique(np.asarray(c.label)) for c in tiny_cases))
    for _ in range(3):
        images, labels = sampler.sample()
        assert images.shape == (8, 1, *patch) and images.dtype == np.float32
        assert labels.shape == (8, *patch) and labels.dtype == np.int64
        assert np.isfinite(images).all()
        assert set(np.unique(labels)) <= label_values


def test_the_transforms_are_nnunets_set_in_its_order():
    transforms = training_transforms(3, Augmentation(), seed=0).transforms
    kinds = [type(t) for t in transforms]
    assert kinds == [mt.RandFlipd] * 3 + [
        mt.RandRotated, mt.RandZoomd, mt.RandGaussianNoised, mt.RandGaussianSmoothd,
        mt.RandScaleIntensityd, mt.RandSimulateLowResolutiond, mt.RandAdjustContrastd,
    ]  # fmt: skip
    assert [t.prob for t in transforms[:3]] == [0.5] * 3  # every axis, half the samples
    assert all(t.prob == 0.2 for t in transforms[3:] if not isinstance(t, mt.RandScaleIntensityd))
    no_rotation = training_transforms(2, Augmentation(rotation_deg=0.0), seed=0).transforms
    assert not any(isinstance(t, mt.RandRotated) for t in no_rotation)


def test_with_probability_0_only_mirroring_and_intensity_scaling_remain():
    image, label = square_sample()
    transforms = training_transforms(2, Augmentation(0.0, 15.0, 0.1), seed=0)
    for _ in range(20):
        out_image, out_label = augment(image, label, transforms)
        assert out_image.dtype == np.float32 and out_label.dtype == label.dtype
        flips = [
            axes
            for n in range(3)
            for axes in itertools.combinations((0, 1), n)
            if np.array_equal(out_label, np.flip(label, axes))
        ]
        assert flips, "the label is only mirrored"
        flipped = np.flip(image, tuple(axis + 1 for axis in flips[0]))
        factor = out_image / flipped
        assert np.allclose(factor, factor.flat[0], rtol=1e-5)
        assert 0.9 <= factor.flat[0] <= 1.1


def test_with_probability_1_every_sample_is_more_than_mirrored_and_scaled():
    image, label = square_sample()
    transforms = training_transforms(2, Augmentation(probability=1.0), seed=0)
    for _ in range(5):
        out_image, out_label = augment(image, label, transforms)
        assert out_image.shape == image.shape and out_label.shape == label.shape
        assert set(np.unique(out_label)) <= set(np.unique(label))  # nearest neighbour
        ratios = [out_image / np.flip(image, axes) for n in range(3)
                  for axes in itertools.combinations((1, 2), n)]  # fmt: skip
        assert not any(np.allclose(r, r.flat[0], rtol=1e-3) for r in ratios)


def test_the_sampler_is_deterministic_under_a_seed(tiny_cases):
    def batches(seed: int) -> list[np.ndarray]:
        sampler = PatchSampler(tiny_cases, (24, 24, 8), 4, 0.5, True, seed=seed,
                               augment_probability=0.5)  # fmt: skip
        return [array for _ in range(3) for array in sampler.sample()]

    first, again, other = batches(0), batches(0), batches(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_training_sampler_takes_the_probability_from_the_train_config(tiny_cases):
    cfg = TrainConfig(patch_size_2d=(32, 32), augment_probability=0.35)
    sampler = training_sampler(tiny_cases, cfg, 2, seed=0, slicing=Slicing())
    assert sampler.augmentation == Augmentation(0.35, cfg.rotation_deg, cfg.intensity_scale)
    with pytest.raises(ValueError, match="augment_probability"):
        TrainConfig(augment_probability=1.5)


def test_checking_data_loads_no_torch():
    """Bad input is reported before torch loads: nas.data is part of that check, and only a
    sampler that augments loads MONAI (and so torch)."""
    code = "import sys, nas.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _loader_batches(cases, workers: int, seed: int, n: int = 4) -> list[np.ndarray]:
    cfg = TrainConfig(patch_size_3d=(24, 24, 8), batch_size_3d=2, augment_probability=0.5)
    batches = training_batches(cases, cfg, 3, seed, Slicing(), torch.device("cpu"), workers)
    return [array.numpy() for _, batch in zip(range(n), batches, strict=False) for array in batch]


def test_background_workers_draw_reproducible_batches(tiny_cases):
    on_thread = _loader_batches(tiny_cases, 0, seed=3)
    one_worker = _loader_batches(tiny_cases, 1, seed=3)
    # Worker 0 draws with the seed itself: one worker serves what the training thread did.
    assert all(np.array_equal(a, b) for a, b in zip(on_thread, one_worker, strict=True))
    two, again = _loader_batches(tiny_cases, 2, seed=3), _loader_batches(tiny_cases, 2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(two, again, strict=True))
    # The second worker's batches are its own stream, not a copy of the first's.
    first_images, second_images = two[0], two[2]
    assert not np.array_equal(first_images, second_images)
    assert len({worker_seed(3, k) for k in range(4)}) == 4
