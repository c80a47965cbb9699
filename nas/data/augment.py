"""Augment training samples as nnU-Net does, with MONAI's transforms.

nnU-Net's default set: mirroring along every axis, rotation, spatial scaling, Gaussian noise,
Gaussian blur, brightness (a multiplicative intensity factor), simulated low resolution and
gamma. Mirroring and brightness apply to every sample; each of the others, independently, to
a share `probability` of the samples (nnU-Net uses 0.1 to 0.3 per transform). The label
follows every spatial transform by nearest neighbour, so it keeps the case's label values.

The transforms are MONAI's, in nnU-Net's order but for mirroring, which comes first (it
commutes with the rest: their ranges are symmetric). MONAI imports torch, so this module is
loaded only where training batches are built (`PatchSampler` with augmentation, in the
training loader's workers); `import nas.data`, which checks a space and its data before
torch loads, does not load it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from monai import transforms as mt
from monai.data import set_track_meta

# nnU-Net's default ranges (nnunetv2 nnUNetTrainer.get_training_transforms).
ZOOM_RANGE = (0.7, 1.4)  # spatial scaling: > 1 magnifies
NOISE_VARIANCE = (0.0, 0.1)  # of a z-scored image, whose variance is 1
BLUR_SIGMA = (0.5, 1.0)  # voxels
LOW_RESOLUTION = (1.0, 2.0)  # downsampling factor per axis
GAMMA_RANGE = (0.7, 1.5)
KEYS = ("image", "label")


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


def training_transforms(spatial_dims: int, settings: Augmentation, seed: int) -> mt.Compose:
    """nnU-Net's augmentation for samples {"image": (C, *spatial), "label": (1, *spatial)} of
    `spatial_dims` dimensions, drawing from its own generator seeded with `seed`."""
    p = settings.probability
    linear = "bilinear" if spatial_dims == 2 else "trilinear"
    steps: list[mt.Transform] = [
        mt.RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)
    ]
    if settings.rotation_deg > 0:
        steps.append(
            mt.RandRotated(
                KEYS,
                range_x=math.radians(settings.rotation_deg),
                prob=p,
                mode=("bilinear", "nearest"),
                padding_mode="border",
            )  # fmt: skip
        )
    steps += [
        mt.RandZoomd(KEYS, prob=p, min_zoom=ZOOM_RANGE[0], max_zoom=ZOOM_RANGE[1],
                     mode=(linear, "nearest"), padding_mode="constant", keep_size=True),
        mt.RandGaussianNoised("image", prob=p, std=math.sqrt(NOISE_VARIANCE[1]),
                              sample_std=True),
        mt.RandGaussianSmoothd("image", prob=p, sigma_x=BLUR_SIGMA, sigma_y=BLUR_SIGMA,
                               sigma_z=BLUR_SIGMA),
        mt.RandScaleIntensityd("image", factors=settings.intensity_scale, prob=1.0),
        mt.RandSimulateLowResolutiond("image", prob=p, upsample_mode=linear,
                                      zoom_range=(1 / LOW_RESOLUTION[1], 1 / LOW_RESOLUTION[0])),
        mt.RandAdjustContrastd("image", prob=p, gamma=GAMMA_RANGE, retain_stats=True),
    ]  # fmt: skip
    set_track_meta(False)  # plain tensors: no metadata to carry between the steps
    compose = mt.Compose(steps)
    compose.set_random_state(seed=seed % 2**32)
    return compose


def augment(
    image: np.ndarray, label: np.ndarray, transforms: mt.Compose
) -> tuple[np.ndarray, np.ndarray]:
    """image (C, *spatial) float32, label (*spatial): the sample through `transforms`, its
    shapes and dtypes kept."""
    out = transforms({"image": image, "label": label[None]})
    augmented = np.asarray(out["image"], dtype=np.float32)
    return augmented, np.asarray(out["label"])[0].astype(label.dtype, copy=False)
