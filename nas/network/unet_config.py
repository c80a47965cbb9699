"""What defines a U-Net: `UNetConfig`, a frozen and JSON-serialisable description that the
builder turns into a network. Plain data and its checks, no framework: a search space or a
model card is validated against it without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import ConfigDict, model_validator
from pydantic.dataclasses import dataclass

Norm = Literal["batch", "instance", "group", "none"]
Activation = Literal["relu", "leaky_relu", "gelu"]
Upsampling = Literal["transposed", "interpolate"]
SkipMode = Literal["concat", "add"]

# Fields that may hold one value per stage, and how many stages each has for a given depth:
# every resolution stage has a kernel size; every stage but the deepest has a skip.
PER_STAGE_FIELDS = {"kernel_size": 0, "skips": -1}


# Upper bounds, so that a typo in a search space or architecture.yaml fails one config instead
# of exhausting the machine. depth: a 10th stage already sees the patch downsampled 512-fold,
# the largest 3D patch train.py admits. Channels: 8x the widest stages of published U-Nets
# (nnU-Net caps 3D at 320, 2D at 512). convs_per_stage: nnU-Net's residual encoders use up to 6.
UPPER_BOUNDS = {"depth": 10, "base_channels": 4096, "max_channels": 4096, "convs_per_stage": 8}
# Large-kernel segmentation CNNs (MedNeXt, 3D UX-Net) stop at 7; 15 leaves room to explore.
MAX_KERNEL_SIZE = 15


def per_stage_length(field: str, depth: int) -> int:
    """How many per-stage values `field` takes in a network of `depth` resolution stages."""
    return depth + PER_STAGE_FIELDS[field]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class UNetConfig:
    """Everything that defines a U-Net; JSON-serialisable through `to_dict`/`from_dict`.

    depth: number of resolution stages (1 means no downsampling at all).
    base_channels: feature maps of the first stage; stage i has
        round(base_channels * channel_growth**i), capped at max_channels.
    kernel_size: odd convolution size, one for all stages or one per stage.
    skips: encoder-to-decoder connections, one flag for all or one per stage above the
        bottleneck (highest resolution first); all False gives a plain encoder-decoder.
    skip_mode: how a skip joins the upsampled features: concatenated or added.
    anisotropic_stages: 3D only; how many of the first downsamplings keep the last (slice)
        axis, as nnU-Net does for thick-slice scans (all of them when depth is smaller).
    deep_supervision: train with a 1x1 head at each decoder stage below full resolution as
        well, as nnU-Net does (see `UNet`); the deployed network has only the full-resolution
        head.
    """

    spatial_dims: Literal[2, 3] = 2
    in_channels: int = 1
    out_channels: int = 1
    depth: int = 4
    base_channels: int = 16
    channel_growth: float = 2.0
    max_channels: int = 320
    kernel_size: int | tuple[int, ...] = 3
    convs_per_stage: int = 2
    norm: Norm = "instance"
    activation: Activation = "leaky_relu"
    upsampling: Upsampling = "transposed"
    dropout: float = 0.0
    residual: bool = False
    skip_mode: SkipMode = "concat"
    skips: bool | tuple[bool, ...] = True
    anisotropic_stages: int = 0
    deep_supervision: bool = False

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        positive = ("in_channels", "out_channels", "depth", "base_channels", "max_channels")
        for name in (*positive, "convs_per_stage"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, limit in UPPER_BOUNDS.items():
            if getattr(self, name) > limit:
                raise ValueError(f"{name} must be at most {limit}, got {getattr(self, name)}")
        if self.channel_growth < 1.0:
            raise ValueError(f"channel_growth must be at least 1.0, got {self.channel_growth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for k in self.kernel_sizes:
            if k < 1 or k % 2 == 0:
                raise ValueError(f"kernel_size must be odd and positive, got {k}")
            if k > MAX_KERNEL_SIZE:
                raise ValueError(f"kernel_size must be at most {MAX_KERNEL_SIZE}, got {k}")
        for field in PER_STAGE_FIELDS:
            value = getattr(self, field)
            expected = per_stage_length(field, self.depth)
            if isinstance(value, tuple) and len(value) != expected:
                raise ValueError(
                    f"{field} has {len(value)} values; depth {self.depth} needs {expected}"
                )
        if self.spatial_dims == 2 and self.anisotropic_stages:
            raise ValueError("anisotropic_stages applies to 3D networks only")
        if self.anisotropic_stages < 0:
            raise ValueError(
                f"anisotropic_stages must be at least 0, got {self.anisotropic_stages}"
            )
        return self

    @property
    def features_per_stage(self) -> tuple[int, ...]:
        return tuple(
            min(self.max_channels, max(1, round(self.base_channels * self.channel_growth**i)))
            for i in range(self.depth)
        )

    @property
    def kernel_sizes(self) -> tuple[int, ...]:
        if isinstance(self.kernel_size, tuple):
            return self.kernel_size
        return (self.kernel_size,) * self.depth

    @property
    def skips_per_stage(self) -> tuple[bool, ...]:
        if isinstance(self.skips, tuple):
            return self.skips
        return (self.skips,) * (self.depth - 1)

    @property
    def strides(self) -> tuple[tuple[int, ...], ...]:
        """Downsampling factor per axis entering each stage; stage 0 keeps full resolution."""
        strides = [(1,) * self.spatial_dims]
        for stage in range(1, self.depth):
            keep_last_axis = stage <= self.anisotropic_stages
            strides.append((2,) * (self.spatial_dims - 1) + ((1,) if keep_last_axis else (2,)))
        return tuple(strides)

    @property
    def stage_downsampling(self) -> tuple[tuple[int, ...], ...]:
        """Per stage, how many input voxels per axis one of its voxels spans (1 at stage 0)."""
        return tuple(
            tuple(math.prod(axis) for axis in zip(*self.strides[: stage + 1], strict=True))
            for stage in range(self.depth)
        )

    @property
    def size_multiple(self) -> tuple[int, ...]:
        """Spatial sizes must be a multiple of this per axis for the skips to line up."""
        return self.stage_downsampling[-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def padded_size(cfg: UNetConfig, spatial: Sequence[int]) -> tuple[int, ...]:
    """The spatial size the network convolves for an input of size `spatial`: each axis padded
    up to a multiple of `cfg.size_multiple`."""
    multiple = cfg.size_multiple
    padded = [-(-size // m) * m for size, m in zip(spatial, multiple, strict=True)]
    if all(p == m for p, m in zip(padded, multiple, strict=True)):
        # A single bottleneck voxel breaks instance (and batch-of-one) normalisation.
        padded[0] *= 2
    return tuple(padded)
