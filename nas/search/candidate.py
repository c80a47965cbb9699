"""`Candidate`: one architecture and how it trains, the pair of frozen configs a search trial
samples from the space and records, and every later step (measuring, training, retraining,
cross-validation, export) reads back. No Optuna, no torch.
"""

from __future__ import annotations

import dataclasses

from nas.network.unet_config import UNetConfig
from nas.training.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One sampled architecture and how to train it."""

    unet: UNetConfig
    train: TrainConfig
