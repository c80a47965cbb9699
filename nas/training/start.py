"""The network a training run starts from, fresh or resumed: one rule for the search's
segments, retraining and cross-validation.

A fresh run starts from `initial_model` (random weights from the seed, or the checkpoint
`init_weights` names). A run that goes on from a saved state starts from the seed's network
whose weights the state's then replace, so the init_weights file is not read again.
"""

from __future__ import annotations

from nas.network.builder import UNet
from nas.network.unet_config import UNetConfig
from nas.training.fit import init_model, initial_model
from nas.training.train_config import TrainConfig


def starting_model(unet: UNetConfig, train: TrainConfig, resumed: bool = False) -> UNet:
    """The network a run of `unet` trained as `train` starts from; `resumed`: it goes on from
    a saved state, whose weights the caller loads into it. Raises CandidateFailed where
    init_weights does not fit the network."""
    if resumed:
        return init_model(unet, train.seed)
    return initial_model(unet, train)
