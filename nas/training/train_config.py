"""How one candidate is trained: `TrainConfig`, frozen and validated. Plain data, no
framework, so a search space is checked without loading torch; nas.training.fit runs it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass as config_dataclass

# The largest patch per axis: a whole 1024^2 slice (the largest common CT/MR matrix) in 2D, a
# whole 512^3 volume in 3D; larger would have to be mostly padding on any real scan.
MAX_PATCH_SIZE = {2: 1024, 3: 512}


@config_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TrainConfig:
    """How one candidate is trained.

    batches_per_epoch: training batches between two validations.
    batch_size_2d / patch_size_2d: slices per batch and in-plane slice crop, for 2D networks.
    batch_size_3d / patch_size_3d: patches per batch and patch size (X, Y, Z), for 3D networks.
        A search space may leave these four to `auto`; nas.search.patch_plan turns that into sizes
        before any trial, so a TrainConfig never holds it.
    foreground_fraction: share of samples centred on a foreground voxel.
    augment: nnU-Net's augmentation (nas.data.augment): every sample is mirrored at random
        and its intensities scaled by up to +-intensity_scale; rotation (in-plane, up to
        +-rotation_deg), spatial scaling, Gaussian noise, Gaussian blur, simulated low
        resolution and gamma each apply to a share augment_probability of the samples.
    augment_probability: that share, per transform. nnU-Net uses 0.1 to 0.3; 0.2 keeps
        rotation as common as it always was here. 0 leaves mirroring and intensity scaling.
        Searchable like any float ({type: float, low: 0.0, high: 0.5}).
    max_seconds: the trial's training budget in wall-clock seconds (None: epochs only).
    init_weights: fine-tuning: a checkpoint (.pt state_dict, or a folder nas export wrote)
        whose tensors the network starts from instead of random weights; every tensor must
        have the network's shape (deep supervision's heads may be missing).
    """

    # Upper bounds, so that a typo fails one config instead of exhausting the machine; nnU-Net
    # trains 1000 epochs of 250 batches of 2 (3D) to 50 (2D) samples.
    epochs: int = Field(8, ge=1, le=100_000)
    batches_per_epoch: int = Field(25, ge=1, le=100_000)
    batch_size_2d: int = Field(16, ge=1, le=1024)
    batch_size_3d: int = Field(2, ge=1, le=1024)
    patch_size_2d: tuple[int, int] = (64, 64)
    patch_size_3d: tuple[int, int, int] = (48, 48, 32)
    foreground_fraction: float = Field(0.33, ge=0.0, le=1.0)
    augment: bool = True
    rotation_deg: float = Field(15.0, ge=0.0, le=180.0)
    intensity_scale: float = Field(0.1, ge=0.0, lt=1.0)
    augment_probability: float = Field(0.2, ge=0.0, le=1.0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    max_seconds: float | None = Field(None, gt=0.0)
    init_weights: str | None = None
    seed: int = 0

    @field_validator(
        "batch_size_2d", "batch_size_3d", "patch_size_2d", "patch_size_3d", mode="before"
    )
    @classmethod
    def _refuse_auto(cls, value: object, info: ValidationInfo) -> object:
        # The trainer must see the sizes it trains with; "auto" belongs to the search space.
        if isinstance(value, str) and value == "auto":
            raise ValueError(
                f"{info.field_name} is 'auto': plan it from the dataset first "
                "(nas.search.patch_plan.plan_patches)"
            )
        return value

    @field_validator("patch_size_2d", "patch_size_3d")
    @classmethod
    def _check_patch_size(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        limit = MAX_PATCH_SIZE[len(value)]
        if not all(1 <= size <= limit for size in value):
            raise ValueError(
                f"{info.field_name} must be between 1 and {limit} per axis, got {value}"
            )
        return value

    def patch_size(self, spatial_dims: int) -> tuple[int, ...]:
        """The training patch (and inference window) of a 2D or 3D network."""
        return self.patch_size_2d if spatial_dims == 2 else self.patch_size_3d

    def batch_size(self, spatial_dims: int) -> int:
        return self.batch_size_2d if spatial_dims == 2 else self.batch_size_3d
