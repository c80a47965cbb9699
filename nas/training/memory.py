"""The memory one training step of a candidate needs, from its configs alone, before anything
is built (nas.network.memory's estimate at the training batch, patch and optimizer), and the
check that it fits the limit a search gives it.
"""

from __future__ import annotations

from nas.core.resources import format_gb
from nas.network.memory import estimate_step_bytes
from nas.network.unet_config import UNetConfig
from nas.training.train_config import TrainConfig

EXTRA_WEIGHT_COPIES = {"adamw": 4, "adam": 4, "sgd": 3}  # Adam: 2 moments; SGD: momentum


def estimate_training_bytes(unet: UNetConfig, train: TrainConfig, in_channels: int) -> int:
    """Bytes one training step of this candidate needs at its peak: the weights, their
    gradients and the optimizer's state, and the activations of one batch at the training
    patch (batch_size_2d x patch_size_2d or batch_size_3d x patch_size_3d), times the safety
    factor. in_channels: the input channels the data provides."""
    if unet.spatial_dims == 2:
        batch, patch = train.batch_size_2d, train.patch_size_2d
    else:
        batch, patch = train.batch_size_3d, train.patch_size_3d
    copies = EXTRA_WEIGHT_COPIES[train.optimizer]
    return estimate_step_bytes(unet, batch, patch, in_channels, copies)


def check_fits(
    unet: UNetConfig, train: TrainConfig, in_channels: int, limit_bytes: int
) -> str | None:
    """None if training the candidate fits in `limit_bytes`, else the reason in one line."""
    needed = estimate_training_bytes(unet, train, in_channels)
    if needed <= limit_bytes:
        return None
    return (
        f"needs about {format_gb(needed)} to train, more than the {format_gb(limit_bytes)} "
        "limit (max_memory_gb)"
    )
