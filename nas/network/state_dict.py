"""A network's weights as a file: a state_dict saved by nas (a search checkpoint, a fold, a
retrained or exported model), read back with weights_only=True, its values checked finite
and its tensors against the network it is loaded into, so that a wrong or damaged file is
one line naming it and the first tensor that does not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nas.core.errors import NasError
from nas.network.model_card import CARD_FILE, WEIGHTS_FILE, read_card


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict file (weights_only), or a NasError naming the file. A folder written by
    nas export stands for its weights.pt (an ensemble's: its first member's)."""
    if path.is_dir() and (path / CARD_FILE).is_file():
        path = read_card(path).member_folders(path)[0] / WEIGHTS_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NasError(path, "not found") from None
    except Exception as err:  # pickle and zip errors of a corrupt or foreign file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NasError(path, f"cannot be read as PyTorch weights ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NasError(path, "is not a checkpoint of weights (a state_dict of tensors)")
    for name, tensor in state.items():  # a diverged or damaged network predicts nothing but NaN
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NasError(path, f"tensor {name} holds NaN or infinite values")
    return state


def first_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """The first tensor in which `state` does not fit `model`, in words; None if it fits.
    Deep supervision's heads, which only training reads, may be absent (an export drops them)."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            if name.startswith("aux_heads."):
                continue
            return f"{name} is missing"
        if tuple(state[name].shape) != tuple(tensor.shape):
            return f"{name} is {tuple(state[name].shape)}, the network's {tuple(tensor.shape)}"
    extra = [name for name in state if name not in own]
    return f"{extra[0]} is not in the network" if extra else None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict saved by nas into `model`, or a NasError naming the file and the
    first tensor that does not fit."""
    state = read_weights(path)
    problem = first_mismatch(model, state)
    if problem is not None:
        raise NasError(path, f"does not match the architecture: {problem}")
    model.load_state_dict(state, strict=False)
