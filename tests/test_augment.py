"""Augmentation as nnU-Net does it: what each transform does to a sample, and the sampler's
batches with all of them on, with none, and under a seed."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from nas.data import PatchSampler, Slicing
from nas.data.augment import (
    Augmentation,
    add_noise,
    adjust_gamma,
    augment,
    blur,
    simulate_low_resolution,
    zoom,
)
from nas.train_config import TrainConfig


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


def test_each_transform_keeps_a_sample_its_shape_and_dtype():
    image, label = square_sample()
    for transformed in (
        zoom(image, label, 1.3)[0],
        add_noise(image, 0.05, np.random.default_rng(0)),
        blur(image, 0.7),
        simulate_low_resolution(image, 1.6),
        adjust_gamma(image, 1.4),
    ):
        assert transformed.shape == image.shape and transformed.dtype == np.float32
    zoomed_label = zoom(image, label, 0.8)[1]
    assert zoomed_label.dtype == np.uint8 and set(np.unique(zoomed_label)) <= {0, 1, 2}


def test_zoom_magnifies_about_the_centre_and_pads_with_background():
    image, label = square_sample()
    larger = zoom(image, label, 2.0)[1]
    smaller_image, smaller = zoom(image, label, 0.7)
    assert (larger > 0).sum() == pytest.approx(4 * (label > 0).sum(), rel=0.2)
    assert (smaller > 0).sum() == pytest.approx(0.49 * (label > 0).sum(), rel=0.25)
    assert smaller_image[0, 0, 0] == 0 and smaller[0, 0] == 0  # padded corner


def test_intensity_transforms_do_what_nnunet_does():
    image, _ = square_sample(64)
    rng = np.random.default_rng(1)
    noise = add_noise(image, 0.1, rng) - image
    assert noise.std() == pytest.approx(np.sqrt(0.1) * image.std(), rel=0.1)
    assert blur(image, 1.0).std() < 0.5 * image.std()  # white noise averages out
    gamma = adjust_gamma(image, 1.5)
    assert not np.allclose(gamma, image)
    assert gamma.mean() == pytest.approx(image.mean(), abs=1e-4)  # retain_stats
    assert gamma.std() == pytest.approx(image.std(), rel=1e-4)
    coarse = simulate_low_resolution(image, 2.0)
    assert not np.allclose(coarse, image)
    assert np.abs(np.diff(coarse, axis=1)).mean() < np.abs(np.diff(image, axis=1)).mean()


def test_with_probability_0_only_mirroring_and_intensity_scaling_remain():
    image, label = square_sample()
    settings = Augmentation(probability=0.0, rotation_deg=15.0, intensity_scale=0.1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out_image, out_label = augment(image, label, settings, rng)
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
    rng = np.random.default_rng(0)
    for _ in range(5):
        out_image, _ = augment(image, label, Augmentation(probability=1.0), rng)
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
    from nas.train import training_sampler

    cfg = TrainConfig(patch_size_2d=(32, 32), augment_probability=0.35)
    sampler = training_sampler(tiny_cases, cfg, 2, seed=0, slicing=Slicing())
    assert sampler.augmentation == Augmentation(0.35, cfg.rotation_deg, cfg.intensity_scale)
    with pytest.raises(ValueError, match="augment_probability"):
        TrainConfig(augment_probability=1.5)


def test_augmentation_loads_without_torch():
    """Bad input is reported before torch loads, and nas.data is part of that check."""
    code = "import sys, nas.data.augment, nas.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
