"""Augment one training sample as nnU-Net does, in numpy and scipy.ndimage.

nnU-Net's default set: mirroring along every axis, rotation, spatial scaling, Gaussian noise,
Gaussian blur, brightness (a multiplicative intensity factor), simulated low resolution and
gamma. Mirroring and brightness apply to every sample; each of the others, independently, to
a share `probability` of the samples (nnU-Net uses 0.1 to 0.3 per transform). The label
follows every spatial transform by nearest neighbour, so it keeps the case's label values.

No torch, hence no MONAI transforms (MONAI imports torch): nas.data checks a space and its
data before torch loads, and the sampler runs on the host, whose batches the trainer only
moves to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# nnU-Net's default ranges (nnunetv2 nnUNetTrainer.get_training_transforms).
ZOOM_RANGE = (0.7, 1.4)  # spatial scaling: > 1 magnifies
NOISE_VARIANCE = (0.0, 0.1)  # of the sample's own variance (1 on a z-scored image)
BLUR_SIGMA = (0.5, 1.0)  # voxels
LOW_RESOLUTION = (1.0, 2.0)  # downsampling factor per axis
GAMMA_RANGE = (0.7, 1.5)


@dataclass(frozen=True)
class Augmentation:
    """How training samples are augmented.

    probability: the share of samples each of rotation, scaling, noise, blur, low resolution
        and gamma is applied to; mirroring and brightness apply to every sample.
    rotation_deg: rotations by up to +-rotation_deg in the first two spatial axes (the slice
        plane in 2D, axial in 3D).
    intensity_scale: brightness: intensities times a factor within 1 +- intensity_scale.
    """

    probability: float = 0.2
    rotation_deg: float = 15.0
    intensity_scale: float = 0.1


def augment(
    image: np.ndarray, label: np.ndarray, settings: Augmentation, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """image (C, *spatial) float32, label (*spatial): the sample with transforms drawn from
    `rng`, in nnU-Net's order but for mirroring, which comes first as it always did here
    (it commutes with the rest: their ranges are symmetric); shapes and dtypes are kept."""
    image, label = mirror(image, label, rng)
    applies = settings.probability
    if settings.rotation_deg > 0 and rng.random() < applies:
        angle = rng.uniform(-settings.rotation_deg, settings.rotation_deg)
        image, label = rotate(image, label, angle)
    if rng.random() < applies:
        image, label = zoom(image, label, rng.uniform(*ZOOM_RANGE))
    if rng.random() < applies:
        image = add_noise(image, rng.uniform(*NOISE_VARIANCE), rng)
    if rng.random() < applies:
        image = blur(image, rng.uniform(*BLUR_SIGMA))
    factor = rng.uniform(1 - settings.intensity_scale, 1 + settings.intensity_scale)
    image = image * np.float32(factor)
    if rng.random() < applies:
        image = simulate_low_resolution(image, rng.uniform(*LOW_RESOLUTION))
    if rng.random() < applies:
        image = adjust_gamma(image, _gamma(rng))
    return image, label


def mirror(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flipped along each spatial axis with probability 1/2."""
    for axis in range(label.ndim):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis + 1), np.flip(label, axis)
    return image, label


def rotate(image: np.ndarray, label: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotated by `angle_deg` in the first two spatial axes, edges extended."""
    image = ndimage.rotate(image, angle_deg, axes=(1, 2), reshape=False, order=1, mode="nearest")
    label = ndimage.rotate(label, angle_deg, axes=(0, 1), reshape=False, order=0, mode="nearest")
    return image, label


def zoom(image: np.ndarray, label: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Magnified `factor`-fold about the centre (shrunk below 1), cropped or padded back to
    the sample's size; padding is 0 (the mean of a z-scored image, and background), as in
    nnU-Net."""
    for axis, size in enumerate(label.shape):
        centre = (size - 1) / 2
        reads = centre + (np.arange(size) - centre) / factor  # where each output voxel reads
        image = _resample_axis(image, axis + 1, reads, order=1)
        label = _resample_axis(label, axis, reads, order=0)
    return image, label


def add_noise(image: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Plus Gaussian noise of `variance` times each channel's own variance."""
    spatial = tuple(range(1, image.ndim))
    sigma = np.sqrt(np.float32(variance)) * image.std(axis=spatial, keepdims=True)
    return image + rng.standard_normal(image.shape, dtype=np.float32) * sigma


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed along the spatial axes, `sigma` voxels."""
    return ndimage.gaussian_filter(image, sigma=(0,) + (sigma,) * (image.ndim - 1))


def simulate_low_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """Downsampled `factor`-fold by nearest neighbour and back by linear interpolation: the
    look of a scan acquired at a coarser resolution."""
    coarse = image
    for axis in range(1, image.ndim):
        size = image.shape[axis]
        reads = np.linspace(0, size - 1, max(round(size / factor), 1))
        coarse = _resample_axis(coarse, axis, reads, order=0)
    for axis in range(1, image.ndim):
        reads = np.linspace(0, coarse.shape[axis] - 1, image.shape[axis])
        coarse = _resample_axis(coarse, axis, reads, order=1)
    return coarse


def _resample_axis(array: np.ndarray, axis: int, reads: np.ndarray, order: int) -> np.ndarray:
    """`array` read at the fractional voxel coordinates `reads` along `axis`: linearly
    (order 1) or from the nearest voxel (order 0); a coordinate off the axis reads 0.

    Scaling along each axis in turn is what a diagonal affine transform does; done here with
    numpy in float32 it costs a third of scipy.ndimage's spline machinery (float64), which
    matters on 3D patches.
    """
    size = array.shape[axis]
    shape = [1] * array.ndim
    shape[axis] = -1
    nearest = np.round(reads)
    if order == 0:
        out = array.take(np.clip(nearest, 0, size - 1).astype(np.intp), axis)
    else:
        lower = np.clip(np.floor(reads), 0, size - 1).astype(np.intp)
        upper = np.minimum(lower + 1, size - 1)
        weight = np.clip(reads - lower, 0, 1).astype(array.dtype).reshape(shape)
        below = array.take(lower, axis)
        out = below + (array.take(upper, axis) - below) * weight
    inside = (nearest >= 0) & (nearest <= size - 1)
    if inside.all():
        return out
    return np.where(inside.reshape(shape), out, array.dtype.type(0))


def _gamma(rng: np.random.Generator) -> float:
    """As nnU-Net draws it: half the time below 1, half above, so both are equally common
    although the range above 1 is wider."""
    if rng.random() < 0.5:
        return rng.uniform(GAMMA_RANGE[0], 1.0)
    return rng.uniform(1.0, GAMMA_RANGE[1])


def adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """Each channel rescaled to [0, 1], raised to `gamma` and rescaled back, its mean and
    standard deviation then restored (nnU-Net's retain_stats), so a z-scored input stays
    z-scored."""
    out = np.empty_like(image)
    for channel, values in enumerate(image):
        low, high = values.min(), values.max()
        if high <= low:  # a constant channel has no contrast to change
            out[channel] = values
            continue
        mean, std = values.mean(), values.std()
        adjusted = ((values - low) / (high - low)) ** np.float32(gamma) * (high - low) + low
        out[channel] = (adjusted - adjusted.mean()) / max(adjusted.std(), 1e-7) * std + mean
    return out
